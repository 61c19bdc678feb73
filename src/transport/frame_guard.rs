//! The client's WebSocket framing, checked on its way in, so that framing the hub cannot
//! accept ends the connection with a close frame and the RFC 6455 code that fits (1002, 1007,
//! 1009), not a dropped connection: actix reports invalid UTF-8 in a text frame and reserved
//! bits as I/O errors, which look like a lost connection to the session. It also refuses a
//! frame over `max_frame_bytes` at its header, where actix would buffer all of it first.
//!
//! [`InboundGuard`] follows every frame header and the text payloads. At the first violation
//! it passes on the frames before it, then passes nothing more and reads on only to find the
//! client's close frame. [`OutboundCloser`] wraps the session's output: after a violation it
//! sends what the session wrote for the frames before it, then a close frame with the
//! violation's code (unless the session sent one), and ends the connection when the client
//! answers, its input ends, or after [`CLOSE_REPLY_WAIT`]: closing with unread input would
//! reset the connection and lose the close frame.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_http::ws::{CloseCode as WsCloseCode, CloseReason, Parser};
use actix_web::error::PayloadError;
use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use protocol::CloseCode;

use crate::metrics::Metrics;

/// How long the connection stays open for the client's answer to our close frame (as the
/// session waits for the answer to its own).
pub const CLOSE_REPLY_WAIT: Duration = Duration::from_secs(10);

/// Why the client's framing cannot be accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Violation {
    pub code: CloseCode,
    pub reason: &'static str,
}

const fn protocol_error(reason: &'static str) -> Violation {
    Violation { code: CloseCode::ProtocolError, reason }
}

const fn invalid_payload(reason: &'static str) -> Violation {
    Violation { code: CloseCode::InvalidPayload, reason }
}

const fn too_big(reason: &'static str) -> Violation {
    Violation { code: CloseCode::MessageTooBig, reason }
}

/// What one connection's two halves share (one worker thread runs both), and the output
/// side's own state: kept here rather than in [`OutboundCloser`], which is boxed with the
/// session's context as the response body, so that this allocation, paid by every idle
/// connection, stays in its size class (see the session's allocation test).
pub struct Verdict {
    violation: Cell<Option<Violation>>,
    /// The client's close frame arrived after the violation, or its input ended.
    input_over: Cell<bool>,
    /// A close frame went out (the session's, or ours).
    close_sent: Cell<bool>,
    /// The output has ended.
    output_over: Cell<bool>,
    /// Set once the close frame is out: the connection ends at this deadline at the latest.
    closing: Cell<Option<Pin<Box<tokio::time::Sleep>>>>,
    metrics: Arc<Metrics>,
}

impl Verdict {
    pub fn new(metrics: Arc<Metrics>) -> Verdict {
        Verdict {
            violation: Cell::new(None),
            input_over: Cell::new(false),
            close_sent: Cell::new(false),
            output_over: Cell::new(false),
            closing: Cell::new(None),
            metrics,
        }
    }
}

/// Longest control frame payload (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Payload {
    /// Text data: checked to be UTF-8 across the frames of its message.
    Text,
    /// Binary data: passed through unread.
    Binary,
    /// Ping and pong: passed through unread; they may come between a message's fragments.
    PingPong,
    /// A close frame: its code and reason are checked whole.
    Close,
    /// The rest of a frame after a violation, and every frame after it: skipped.
    Discarded,
}

/// Follows the frames of a client's byte stream: strictly until the first violation, then
/// only to find the client's close frame.
#[derive(Debug)]
pub struct FrameScanner {
    /// Largest data frame, and largest message over its fragments, in bytes.
    max_message_bytes: u64,
    /// After a violation: frames are skipped, only a close frame is looked for.
    draining: bool,
    client_closed: bool,
    /// Bytes of the current frame header read so far (at most 14).
    header: [u8; 14],
    header_len: u8,
    /// The frame whose payload is being read, and how much of it is left.
    payload: Option<Payload>,
    remaining: u64,
    fin: bool,
    mask: [u8; 4],
    /// Position in the current payload modulo 4: the mask byte that applies next.
    mask_offset: u8,
    /// The kind of the fragmented message in progress, if any (`true`: text), and its size
    /// so far.
    fragmented_text: Option<bool>,
    message_bytes: u64,
    /// The end of a text message's last complete character, carried into its next bytes.
    utf8_carry: [u8; 4],
    utf8_carry_len: u8,
    /// A close frame's payload so far (boxed: every connection holds a scanner, few read a
    /// close frame's reason; a `Vec` inline would cost each 16 bytes more).
    #[allow(clippy::box_collection)]
    close_payload: Option<Box<Vec<u8>>>,
}

impl FrameScanner {
    pub fn new(max_message_bytes: usize) -> FrameScanner {
        FrameScanner {
            max_message_bytes: max_message_bytes as u64,
            draining: false,
            client_closed: false,
            header: [0; 14],
            header_len: 0,
            payload: None,
            remaining: 0,
            fin: false,
            mask: [0; 4],
            mask_offset: 0,
            fragmented_text: None,
            message_bytes: 0,
            utf8_carry: [0; 4],
            utf8_carry_len: 0,
            close_payload: None,
        }
    }

    /// Whether a violation was found (everything after it is skipped).
    pub fn draining(&self) -> bool {
        self.draining
    }

    /// Whether the client's close frame came after the violation.
    pub fn client_closed(&self) -> bool {
        self.client_closed
    }

    /// Follow `chunk`. At the first violation, returns it with how many bytes of `chunk`
    /// precede the frame that broke the rules (0 when that frame began in an earlier chunk);
    /// the rest of the chunk is followed as after a violation.
    pub fn scan(&mut self, chunk: &[u8]) -> Option<(usize, Violation)> {
        let mut first = None;
        let mut i = 0;
        // Where the current frame began in this chunk, when it did.
        let mut frame_start = None;
        while i < chunk.len() && !self.client_closed {
            let mut found = if self.payload.is_none() {
                if self.header_len == 0 {
                    frame_start = Some(i);
                }
                let (taken, checked) = self.read_header(&chunk[i..]);
                i += taken;
                checked.err()
            } else {
                let n = usize::try_from(self.remaining).unwrap_or(usize::MAX).min(chunk.len() - i);
                i += n;
                self.read_payload(&chunk[i - n..i]).err()
            };
            if self.payload.is_some() && self.remaining == 0 {
                found = found.or(self.end_frame().err());
            }
            if let (Some(violation), false) = (found, self.draining) {
                self.draining = true;
                first = Some((frame_start.unwrap_or(0), violation));
            }
        }
        first
    }

    /// Take header bytes from `input`, and check the header once it is whole; returns how
    /// many bytes it took.
    fn read_header(&mut self, input: &[u8]) -> (usize, Result<(), Violation>) {
        let mut taken = 0;
        while usize::from(self.header_len) < self.header_needed() {
            let Some(&byte) = input.get(taken) else { return (taken, Ok(())) };
            self.header[usize::from(self.header_len)] = byte;
            self.header_len += 1;
            taken += 1;
        }
        (taken, self.start_frame())
    }

    /// Length of the current header, as far as its first bytes tell.
    fn header_needed(&self) -> usize {
        if self.header_len < 2 {
            return 2;
        }
        let extended = match self.header[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        2 + extended + mask
    }

    /// Begin the frame whose header is whole. On a violation the frame is skipped.
    fn start_frame(&mut self) -> Result<(), Violation> {
        let (b0, b1) = (self.header[0], self.header[1]);
        let masked = b1 & 0x80 != 0;
        let length = match b1 & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.header[2], self.header[3]])),
            127 => {
                let mut be = [0u8; 8];
                be.copy_from_slice(&self.header[2..10]);
                u64::from_be_bytes(be)
            }
            short => u64::from(short),
        };
        if masked {
            let end = usize::from(self.header_len);
            self.mask.copy_from_slice(&self.header[end - 4..end]);
        } else {
            self.mask = [0; 4];
        }
        self.header_len = 0;
        self.remaining = length;
        self.mask_offset = 0;
        self.fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0f;
        if self.draining {
            self.payload = Some(if opcode == 0x8 { Payload::Close } else { Payload::Discarded });
            return Ok(());
        }
        self.payload = Some(Payload::Discarded);
        if b0 & 0x70 != 0 {
            return Err(protocol_error("reserved bits set, and no extension was negotiated"));
        }
        if !masked {
            return Err(protocol_error("client frames must be masked"));
        }
        if length >> 63 != 0 {
            return Err(protocol_error("payload length with its most significant bit set"));
        }
        let payload = match opcode {
            0x0 => match self.fragmented_text {
                None => return Err(protocol_error("continuation frame without a message to continue")),
                Some(text) => {
                    self.message_bytes = self.message_bytes.saturating_add(length);
                    if text { Payload::Text } else { Payload::Binary }
                }
            },
            0x1 | 0x2 => {
                if self.fragmented_text.is_some() {
                    return Err(protocol_error("new message before the fragmented one ended"));
                }
                if !self.fin {
                    self.fragmented_text = Some(opcode == 0x1);
                }
                self.message_bytes = length;
                if opcode == 0x1 { Payload::Text } else { Payload::Binary }
            }
            0x8..=0xa => {
                if !self.fin || length > MAX_CONTROL_PAYLOAD {
                    return Err(protocol_error("control frames must be whole and at most 125 bytes"));
                }
                if opcode == 0x8 { Payload::Close } else { Payload::PingPong }
            }
            _ => return Err(protocol_error("unknown opcode")),
        };
        if matches!(payload, Payload::Text | Payload::Binary) && self.message_bytes > self.max_message_bytes {
            return Err(too_big("message larger than max_frame_bytes"));
        }
        self.payload = Some(payload);
        Ok(())
    }

    /// Read the next `bytes` of the current payload (at most what is left of it).
    fn read_payload(&mut self, bytes: &[u8]) -> Result<(), Violation> {
        self.remaining -= bytes.len() as u64;
        match self.payload {
            Some(Payload::Text) => {
                // Unmasked a block at a time behind the carried bytes of a split character.
                let mut block = [0u8; 4 + 1024];
                for piece in bytes.chunks(1024) {
                    let carry = usize::from(self.utf8_carry_len);
                    block[..carry].copy_from_slice(&self.utf8_carry[..carry]);
                    let offset = usize::from(self.mask_offset);
                    for (j, byte) in piece.iter().enumerate() {
                        block[carry + j] = byte ^ self.mask[(offset + j) % 4];
                    }
                    self.mask_offset = ((offset + piece.len()) % 4) as u8;
                    let text = &block[..carry + piece.len()];
                    self.utf8_carry_len = match std::str::from_utf8(text) {
                        Ok(_) => 0,
                        // The end is a character cut short: keep it for the next bytes.
                        Err(e) if e.error_len().is_none() => {
                            let tail = &text[e.valid_up_to()..];
                            self.utf8_carry[..tail.len()].copy_from_slice(tail);
                            tail.len() as u8
                        }
                        Err(_) => {
                            self.payload = Some(Payload::Discarded);
                            return Err(invalid_payload("text frame is not UTF-8"));
                        }
                    };
                }
            }
            Some(Payload::Close) if !self.draining => {
                let close_payload = self.close_payload.get_or_insert_with(Box::default);
                for byte in bytes {
                    close_payload.push(byte ^ self.mask[usize::from(self.mask_offset)]);
                    self.mask_offset = (self.mask_offset + 1) % 4;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The current frame's payload has been read.
    fn end_frame(&mut self) -> Result<(), Violation> {
        let payload = self.payload.take();
        if self.draining {
            self.client_closed |= payload == Some(Payload::Close);
            return Ok(());
        }
        match payload {
            Some(Payload::Close) => match self.close_payload.take().as_deref().map_or(&[][..], Vec::as_slice) {
                [] => Ok(()),
                [_] => Err(protocol_error("close frame with a one-byte payload")),
                // RFC 6455 §7.4: the codes a peer may send.
                [hi, lo, ..] if !matches!(u16::from_be_bytes([*hi, *lo]), 1000..=1003 | 1007..=1014 | 3000..=4999) => {
                    Err(protocol_error("close frame with a code a peer may not send"))
                }
                [_, _, reason @ ..] if std::str::from_utf8(reason).is_err() => Err(invalid_payload("close reason is not UTF-8")),
                _ => Ok(()),
            },
            // The last frame of a message (a ping or pong between fragments is not).
            Some(Payload::Text | Payload::Binary) if self.fin => {
                let cut_short = payload == Some(Payload::Text) && self.utf8_carry_len != 0;
                self.fragmented_text = None;
                self.message_bytes = 0;
                self.utf8_carry_len = 0;
                if cut_short {
                    return Err(invalid_payload("text message ends inside a UTF-8 character"));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// The request payload of a WebSocket, passed on as far as its framing is acceptable. After
/// the first violation (recorded in the verdict) nothing more is passed on; the input is read
/// on until the client's close frame, then ends.
pub struct InboundGuard<S> {
    inner: S,
    scanner: FrameScanner,
    verdict: Rc<Verdict>,
    ended: bool,
}

impl<S> InboundGuard<S> {
    pub fn new(inner: S, max_frame_bytes: usize, verdict: Rc<Verdict>) -> InboundGuard<S> {
        InboundGuard { inner, scanner: FrameScanner::new(max_frame_bytes), verdict, ended: false }
    }
}

impl<S: Stream<Item = Result<Bytes, PayloadError>> + Unpin> Stream for InboundGuard<S> {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if self.ended || self.scanner.client_closed() {
                self.ended = true;
                self.verdict.input_over.set(true);
                return Poll::Ready(None);
            }
            let chunk = match Pin::new(&mut self.inner).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => chunk,
                Poll::Ready(None) => {
                    self.ended = true;
                    continue;
                }
                other => return other,
            };
            if self.scanner.draining() {
                // Read and dropped, until the client's close frame.
                self.scanner.scan(&chunk);
                continue;
            }
            match self.scanner.scan(&chunk) {
                None => return Poll::Ready(Some(Ok(chunk))),
                Some((before, violation)) => {
                    self.verdict.violation.set(Some(violation));
                    if before > 0 {
                        return Poll::Ready(Some(Ok(chunk.slice(..before))));
                    }
                }
            }
        }
    }
}

/// The session's output; after a violation, a close frame of its code and the end. Its state
/// is in the shared [`Verdict`].
pub struct OutboundCloser<S> {
    inner: S,
    verdict: Rc<Verdict>,
}

impl<S> OutboundCloser<S> {
    pub fn new(inner: S, verdict: Rc<Verdict>) -> OutboundCloser<S> {
        OutboundCloser { inner, verdict }
    }
}

impl<S, E> Stream for OutboundCloser<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    type Item = Result<Bytes, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let verdict = self.verdict.clone();
        if verdict.output_over.get() {
            return Poll::Ready(None);
        }
        if let Some(closing) = verdict.closing.take() {
            return self.poll_closing(cx, closing);
        }
        // The session runs inside this poll, and its input with it: what it wrote for the
        // frames before a violation comes out before the close frame.
        let polled = Pin::new(&mut self.inner).poll_next(cx);
        if let Poll::Ready(Some(Ok(bytes))) = &polled {
            if holds_close_frame(bytes) {
                verdict.close_sent.set(true);
            }
            return polled;
        }
        let Some(violation) = verdict.violation.get() else { return polled };
        if matches!(polled, Poll::Ready(None)) {
            verdict.output_over.set(true);
        }
        let closing = Box::pin(tokio::time::sleep(CLOSE_REPLY_WAIT));
        if verdict.close_sent.replace(true) {
            return self.poll_closing(cx, closing);
        }
        verdict.closing.set(Some(closing));
        verdict.metrics.closed(violation.code);
        tracing::debug!(code = violation.code.code(), reason = violation.reason, "closing a connection whose framing is invalid");
        let mut frame = BytesMut::new();
        let reason = CloseReason { code: WsCloseCode::Other(violation.code.code()), description: Some(violation.reason.to_owned()) };
        Parser::write_close(&mut frame, Some(reason), false);
        Poll::Ready(Some(Ok(frame.freeze())))
    }
}

impl<S, E> OutboundCloser<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
{
    /// After the close frame: nothing more is sent; the end comes with the client's answer,
    /// the end of its input or of the session, or the deadline (`closing`).
    fn poll_closing(&mut self, cx: &mut Context<'_>, mut closing: Pin<Box<tokio::time::Sleep>>) -> Poll<Option<Result<Bytes, E>>> {
        let verdict = &self.verdict;
        while !verdict.output_over.get() {
            match Pin::new(&mut self.inner).poll_next(cx) {
                Poll::Ready(Some(_)) => continue,
                Poll::Ready(None) => verdict.output_over.set(true),
                Poll::Pending => break,
            }
        }
        let deadline_passed = closing.as_mut().poll(cx).is_ready();
        if verdict.output_over.get() || verdict.input_over.get() || deadline_passed {
            verdict.output_over.set(true);
            return Poll::Ready(None);
        }
        verdict.closing.set(Some(closing));
        Poll::Pending
    }
}

/// Whether the hub's own frames in `bytes` include a close frame. The session's output comes
/// in whole frames (actix encodes each message whole into the chunk it hands out), unmasked.
fn holds_close_frame(bytes: &[u8]) -> bool {
    let mut i = 0;
    while let (Some(&b0), Some(&b1)) = (bytes.get(i), bytes.get(i + 1)) {
        if b0 & 0x0f == 0x8 {
            return true;
        }
        let (extended, length) = match b1 & 0x7f {
            126 => (2, bytes.get(i + 2..i + 4).map(|b| u64::from(u16::from_be_bytes([b[0], b[1]])))),
            127 => (8, bytes.get(i + 2..i + 10).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes)),
            short => (0, Some(u64::from(short))),
        };
        let Some(length) = length.and_then(|l| usize::try_from(l).ok()) else { return false };
        i = i.saturating_add(2 + extended).saturating_add(length);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 64 * 1024;

    /// Every connection holds a scanner, in the allocation of the task reading its socket.
    #[test]
    fn the_scanner_stays_small() {
        let size = std::mem::size_of::<FrameScanner>();
        assert!(size <= 64, "the frame scanner is {size} bytes");
    }

    /// A client frame: masked with a fixed key.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend((n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend((n as u64).to_be_bytes());
            }
        }
        out.extend(mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    /// The verdict on `bytes` fed whole and one byte at a time (both must agree).
    fn verdict(bytes: &[u8]) -> Option<CloseCode> {
        let whole = FrameScanner::new(MAX).scan(bytes).map(|(_, v)| v.code);
        let mut scanner = FrameScanner::new(MAX);
        let bytewise = bytes.iter().find_map(|b| scanner.scan(std::slice::from_ref(b))).map(|(_, v)| v.code);
        assert_eq!(whole, bytewise, "{bytes:?}");
        whole
    }

    #[test]
    fn good_framing_passes() {
        let snowman = "☃ snow".as_bytes();
        let long_text = "é".repeat(30_000);
        for bytes in [
            frame(0x81, br#"{"type":"ping","id":1}"#),
            frame(0x82, &[0xc1, 0xff, 0x00]),
            frame(0x81, long_text.as_bytes()),
            frame(0x82, &vec![0; MAX]),
            frame(0x89, b"ping"),
            frame(0x8a, b""),
            frame(0x88, &[0x03, 0xe8, b'o', b'k']),
            frame(0x88, b""),
            // A character split across fragments, with a ping between them.
            [frame(0x01, &snowman[..1]), frame(0x89, b""), frame(0x00, &snowman[1..2]), frame(0x80, &snowman[2..])].concat(),
            [frame(0x02, &[0xff]), frame(0x80, &[0xfe])].concat(),
            [frame(0x02, &vec![0; MAX / 2]), frame(0x80, &vec![0; MAX / 2])].concat(),
        ] {
            assert_eq!(verdict(&bytes), None, "{bytes:?}");
        }
    }

    #[test]
    fn violations_get_their_codes() {
        let snowman = "☃".as_bytes();
        let cases: Vec<(Vec<u8>, CloseCode)> = vec![
            (frame(0x81, b"ok \xff"), CloseCode::InvalidPayload),
            (frame(0x81, &snowman[..2]), CloseCode::InvalidPayload),
            ([frame(0x01, &snowman[..1]), frame(0x80, b"x")].concat(), CloseCode::InvalidPayload),
            (frame(0x88, &[0x03, 0xe8, 0xc3]), CloseCode::InvalidPayload),
            (frame(0xc1, b"{}"), CloseCode::ProtocolError),
            (frame(0xa2, b"{}"), CloseCode::ProtocolError),
            (frame(0x91, b"{}"), CloseCode::ProtocolError),
            (vec![0x81, 0x02, b'{', b'}'], CloseCode::ProtocolError),
            (frame(0x83, b""), CloseCode::ProtocolError),
            (frame(0x80, b"x"), CloseCode::ProtocolError),
            ([frame(0x01, b"a"), frame(0x81, b"b")].concat(), CloseCode::ProtocolError),
            (frame(0x09, b""), CloseCode::ProtocolError),
            (frame(0x89, &[0; 126]), CloseCode::ProtocolError),
            (frame(0x88, &[0x03]), CloseCode::ProtocolError),
            (frame(0x88, &[0x03, 0xed]), CloseCode::ProtocolError),
            (vec![0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4], CloseCode::ProtocolError),
            // Too big: told by the header alone, and over a message's fragments.
            (frame(0x82, &vec![0; MAX + 1])[..14].to_vec(), CloseCode::MessageTooBig),
            ([frame(0x01, &vec![b'a'; MAX / 2]), frame(0x00, &vec![b'a'; MAX / 2]), frame(0x80, b"a")].concat(), CloseCode::MessageTooBig),
        ];
        for (bytes, code) in cases {
            assert_eq!(verdict(&bytes), Some(code), "{bytes:?}");
        }
    }

    #[test]
    fn frames_before_a_violation_are_passed_on_and_the_clients_close_is_found_after_it() {
        let good = frame(0x81, b"{}");
        let close = frame(0x88, &[0x03, 0xe8]);
        let bad = frame(0xc1, b"{}");
        let mut scanner = FrameScanner::new(MAX);
        let bytes = [good.clone(), bad.clone(), frame(0x81, b"\xff")].concat();
        assert_eq!(scanner.scan(&bytes).map(|(before, v)| (before, v.code)), Some((good.len(), CloseCode::ProtocolError)));
        assert!(scanner.draining() && !scanner.client_closed());
        // After the violation nothing is a violation; the close frame ends it.
        assert_eq!(scanner.scan(&[frame(0x83, b"x"), frame(0x82, &vec![0; MAX + 1])].concat()), None);
        assert!(!scanner.client_closed());
        assert_eq!(scanner.scan(&close[..3]), None);
        assert_eq!(scanner.scan(&close[3..]), None);
        assert!(scanner.client_closed());

        // A frame that began in an earlier chunk: nothing of this chunk is passed on; a close
        // in the same chunk as the violation is found.
        let text = frame(0x81, b"{\"a\":\"\xff\"}");
        let mut scanner = FrameScanner::new(MAX);
        assert_eq!(scanner.scan(&text[..4]), None);
        assert_eq!(scanner.scan(&[&text[4..], &close].concat()).map(|(before, v)| (before, v.code)), Some((0, CloseCode::InvalidPayload)));
        assert!(scanner.client_closed());
    }

    #[test]
    fn the_hubs_close_frames_are_seen() {
        let mut out = BytesMut::new();
        Parser::write_message(&mut out, vec![b'x'; 300], actix_http::ws::OpCode::Text, true, false);
        Parser::write_message(&mut out, vec![b'x'; 70_000], actix_http::ws::OpCode::Binary, true, false);
        assert!(!holds_close_frame(&out));
        Parser::write_close(&mut out, None, false);
        assert!(holds_close_frame(&out));
    }
}
