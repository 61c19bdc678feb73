//! Reassembly of fragmented WebSocket messages (continuation frames), bounded by the largest
//! message a session takes. Shared by the sessions of every wire protocol.

use actix_http::ws::Item;
use bytes::{Bytes, BytesMut};

/// A message being reassembled: whether it is text, and its bytes so far.
#[derive(Default)]
pub struct Fragments(Option<(bool, BytesMut)>);

impl Fragments {
    /// Add a fragment. Returns the whole message (is text, bytes) once its last fragment came,
    /// or why the connection must close: a continuation without a first fragment, or a message
    /// over `max_bytes`.
    pub fn add(&mut self, item: Item, max_bytes: usize) -> Result<Option<(bool, Bytes)>, &'static str> {
        let (first_is_text, chunk, last) = match item {
            Item::FirstText(b) => (Some(true), b, false),
            Item::FirstBinary(b) => (Some(false), b, false),
            Item::Continue(b) => (None, b, false),
            Item::Last(b) => (None, b, true),
        };
        if let Some(text) = first_is_text {
            self.0 = Some((text, BytesMut::new()));
        }
        let Some((_, buf)) = self.0.as_mut() else {
            return Err("continuation without a first fragment");
        };
        buf.extend_from_slice(&chunk);
        if buf.len() > max_bytes {
            self.0 = None;
            return Err("message larger than max_frame_bytes");
        }
        if !last {
            return Ok(None);
        }
        Ok(self.0.take().map(|(text, buf)| (text, buf.freeze())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_make_one_message_within_the_limit() {
        let mut f = Fragments::default();
        assert_eq!(f.add(Item::FirstText(Bytes::from_static(b"ab")), 8), Ok(None));
        assert_eq!(f.add(Item::Continue(Bytes::from_static(b"cd")), 8), Ok(None));
        assert_eq!(f.add(Item::Last(Bytes::from_static(b"e")), 8), Ok(Some((true, Bytes::from_static(b"abcde")))));
        assert_eq!(f.add(Item::Last(Bytes::from_static(b"x")), 8), Err("continuation without a first fragment"));
        assert_eq!(f.add(Item::FirstBinary(Bytes::from_static(b"12345")), 8), Ok(None));
        assert_eq!(f.add(Item::Continue(Bytes::from_static(b"6789")), 8), Err("message larger than max_frame_bytes"));
        assert_eq!(f.add(Item::Continue(Bytes::from_static(b"1")), 8), Err("continuation without a first fragment"));
    }
}
