//! `delta` frames and `catch_up` pages assembled from deltas encoded once: a hub that sends
//! the same deltas to many devices, live and then again as catch-up pages, encodes each delta
//! once and copies its bytes after that. The bytes are the same as the serde encoding of the
//! frames (the tests compare them), so a client cannot tell.

use std::ops::Range;

use crate::codec::{encode, Encoding};
use crate::Delta;

/// A `delta` frame and where each of its deltas lies in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedDeltaFrame {
    /// The frame: the bytes of `encode_server(ServerFrame::Delta { deltas, seq })`.
    pub bytes: Vec<u8>,
    /// Byte range of each delta in `bytes`, in order.
    pub deltas: Vec<Range<usize>>,
}

impl EncodedDeltaFrame {
    /// Bytes of deltas `from..to` (indexes into `deltas`), with what separates them: one run
    /// for [`catch_up_page`].
    pub fn run(&self, from: usize, to: usize) -> Range<usize> {
        run_of(&self.deltas, from, to)
    }
}

/// The byte range of deltas `from..to`, given each delta's range ([`EncodedDeltaFrame::deltas`]);
/// empty when that is no delta.
pub fn run_of(deltas: &[Range<usize>], from: usize, to: usize) -> Range<usize> {
    match (deltas.get(from), to.checked_sub(1).and_then(|last| deltas.get(last))) {
        (Some(first), Some(last)) if from < to => first.start..last.end,
        _ => 0..0,
    }
}

/// Encode a `delta` frame one delta at a time, keeping each delta's place.
pub fn delta_frame(encoding: Encoding, deltas: &[Delta], seq: u64) -> EncodedDeltaFrame {
    let mut bytes = Vec::with_capacity(64 + deltas.len() * 256);
    let mut ranges = Vec::with_capacity(deltas.len());
    match encoding {
        Encoding::Json => {
            bytes.extend_from_slice(br#"{"type":"delta","deltas":["#);
            for (i, delta) in deltas.iter().enumerate() {
                if i > 0 {
                    bytes.push(b',');
                }
                let start = bytes.len();
                bytes.extend_from_slice(&encode(encoding, delta));
                ranges.push(start..bytes.len());
            }
            bytes.extend_from_slice(br#"],"seq":"#);
            bytes.extend_from_slice(seq.to_string().as_bytes());
            bytes.push(b'}');
        }
        Encoding::MsgPack => {
            msgpack_map_head(&mut bytes, 3, "delta");
            msgpack_str(&mut bytes, "deltas");
            msgpack_array_len(&mut bytes, deltas.len());
            for delta in deltas {
                let start = bytes.len();
                bytes.extend_from_slice(&encode(encoding, delta));
                ranges.push(start..bytes.len());
            }
            msgpack_str(&mut bytes, "seq");
            msgpack_uint(&mut bytes, seq);
        }
    }
    EncodedDeltaFrame { bytes, deltas: ranges }
}

/// A `catch_up` page of `count` deltas given as encoded runs (each the bytes of one or more
/// consecutive deltas, as [`EncodedDeltaFrame::run`] cuts them), in order: the bytes of
/// `encode_server(ServerFrame::CatchUp { deltas, seq, head_seq })`.
pub fn catch_up_page(encoding: Encoding, runs: &[&[u8]], count: usize, seq: u64, head_seq: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(64 + runs.iter().map(|r| r.len() + 1).sum::<usize>());
    let runs = runs.iter().filter(|run| !run.is_empty());
    match encoding {
        Encoding::Json => {
            bytes.extend_from_slice(br#"{"type":"catch_up","deltas":["#);
            for (i, run) in runs.enumerate() {
                if i > 0 {
                    bytes.push(b',');
                }
                bytes.extend_from_slice(run);
            }
            bytes.extend_from_slice(br#"],"seq":"#);
            bytes.extend_from_slice(seq.to_string().as_bytes());
            bytes.extend_from_slice(br#","head_seq":"#);
            bytes.extend_from_slice(head_seq.to_string().as_bytes());
            bytes.push(b'}');
        }
        Encoding::MsgPack => {
            msgpack_map_head(&mut bytes, 4, "catch_up");
            msgpack_str(&mut bytes, "deltas");
            msgpack_array_len(&mut bytes, count);
            for run in runs {
                bytes.extend_from_slice(run);
            }
            msgpack_str(&mut bytes, "seq");
            msgpack_uint(&mut bytes, seq);
            msgpack_str(&mut bytes, "head_seq");
            msgpack_uint(&mut bytes, head_seq);
        }
    }
    bytes
}

// Writes into a Vec cannot fail: the `expect`s below never fire.

/// A map of `entries` whose first entry is `type`: `frame_type`, as serde writes an
/// internally tagged variant.
fn msgpack_map_head(bytes: &mut Vec<u8>, entries: u32, frame_type: &str) {
    rmp::encode::write_map_len(bytes, entries).expect("write to a Vec");
    msgpack_str(bytes, "type");
    msgpack_str(bytes, frame_type);
}

fn msgpack_str(bytes: &mut Vec<u8>, text: &str) {
    rmp::encode::write_str(bytes, text).expect("write to a Vec");
}

fn msgpack_array_len(bytes: &mut Vec<u8>, len: usize) {
    rmp::encode::write_array_len(bytes, u32::try_from(len).expect("fewer than 2^32 deltas")).expect("write to a Vec");
}

fn msgpack_uint(bytes: &mut Vec<u8>, value: u64) {
    rmp::encode::write_uint(bytes, value).expect("write to a Vec");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::encode_server;
    use crate::{Op, ServerFrame};
    use proptest::prelude::*;
    use serde_json::json;

    fn delta(seq: u64, name: &str) -> Delta {
        Delta {
            seq,
            table: "products".into(),
            op: if seq % 5 == 0 { Op::Delete } else { Op::Upsert },
            key: json!({"id": seq}).as_object().cloned().unwrap(),
            row: (seq % 5 != 0).then(|| json!({"id": seq, "name": name, "price": 1.5, "tags": ["a", null]}).as_object().cloned().unwrap()),
            old: (seq % 2 == 0).then(|| json!({"name": "before"}).as_object().cloned().unwrap()),
            origin: (seq % 3 != 0).then(|| "pos-1".to_string()),
            change_id: (seq % 4 != 0).then(uuid::Uuid::now_v7),
            left: false,
        }
    }

    proptest! {
        /// Frames of 0 to 40 deltas (array headers change at 16), pages cut anywhere across
        /// up to three frames, seqs of every size: byte for byte the serde encoding.
        #[test]
        fn spliced_frames_and_pages_are_the_serde_bytes(
            sizes in proptest::collection::vec(0usize..40, 1..4),
            cut in (0usize..200, 0usize..200),
            base in prop_oneof![Just(0u64), Just(120), Just(70_000), Just(5_000_000_000)],
            head_extra in 0u64..100_000,
            name in "[a-zé\"\\\\ ]{0,12}",
        ) {
            for encoding in [Encoding::Json, Encoding::MsgPack] {
                let mut next = base;
                let mut frames = Vec::new();
                for &size in &sizes {
                    let deltas: Vec<Delta> = (0..size).map(|_| { next += 1; delta(next, &name) }).collect();
                    let encoded = delta_frame(encoding, &deltas, next);
                    let whole = encode_server(encoding, &ServerFrame::Delta { deltas: deltas.clone(), seq: next });
                    prop_assert_eq!(&encoded.bytes, &whole);
                    frames.push((deltas, encoded));
                }
                // A page: every delta from the `cut.0`-th to the `cut.1`-th across the frames.
                let all: Vec<(usize, usize)> = frames.iter().enumerate().flat_map(|(f, (d, _))| (0..d.len()).map(move |i| (f, i))).collect();
                let (from, to) = (cut.0.min(all.len()), cut.1.min(all.len()).max(cut.0.min(all.len())));
                let chosen = &all[from..to];
                let mut runs = Vec::new();
                for (f, (_, encoded)) in frames.iter().enumerate() {
                    let in_frame: Vec<usize> = chosen.iter().filter(|(cf, _)| *cf == f).map(|(_, i)| *i).collect();
                    if let (Some(first), Some(last)) = (in_frame.first(), in_frame.last()) {
                        runs.push(&encoded.bytes[encoded.run(*first, last + 1)]);
                    }
                }
                let page_deltas: Vec<Delta> = chosen.iter().map(|&(f, i)| frames[f].0[i].clone()).collect();
                let seq = page_deltas.last().map_or(base, |d| d.seq);
                let head_seq = seq + head_extra;
                let page = catch_up_page(encoding, &runs, page_deltas.len(), seq, head_seq);
                let whole = encode_server(encoding, &ServerFrame::CatchUp { deltas: page_deltas, seq, head_seq });
                prop_assert_eq!(page, whole);
            }
        }
    }

    #[test]
    fn a_run_past_the_frame_is_empty() {
        let encoded = delta_frame(Encoding::Json, &[delta(1, "a"), delta(2, "b")], 2);
        assert_eq!(encoded.run(0, 0), 0..0);
        assert_eq!(encoded.run(2, 3), 0..0);
        assert_eq!(encoded.run(1, 2), encoded.deltas[1].clone());
        assert_eq!(encoded.run(0, 2), encoded.deltas[0].start..encoded.deltas[1].end);
    }
}
