//! WebSocket framing the hub cannot accept, written byte by byte on a raw TCP socket after a
//! normal upgrade (a WebSocket library would not send it): the hub answers each with a close
//! frame of the RFC 6455 code that fits (1002, 1007, 1009), before or after `hello`, and what
//! the client sent before the bad frame is still answered.

mod common;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MASK: [u8; 4] = [0x5a, 0x13, 0xc4, 0x7e];

/// A client frame with first byte `first` (FIN, RSV bits, opcode), masked when `masked`.
fn frame_with(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut out = vec![first];
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend((n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend((n as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend(MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        out.extend(payload);
    }
    out
}

fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    frame_with(first, payload, true)
}

/// A raw socket after a successful upgrade.
struct RawSocket {
    tcp: TcpStream,
    /// Bytes read past the last whole frame.
    buf: Vec<u8>,
    /// Nothing came within `WAIT`.
    silent: bool,
}

impl RawSocket {
    async fn open(hub: &TestHub) -> RawSocket {
        let mut tcp = TcpStream::connect(hub.addr).await.expect("connect");
        let request = format!(
            "GET /v1/ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            hub.addr
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(WAIT, tcp.read(&mut chunk)).await.expect("upgrade answer in time").unwrap();
            assert!(n > 0, "connection closed during the upgrade");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        RawSocket { tcp, buf: buf[end..].to_vec(), silent: false }
    }

    /// The next whole frame from the hub as (opcode, payload), but the hub's own pings;
    /// `None` when the connection ends without one.
    async fn next_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some(((opcode, payload), used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                if opcode == 0x9 {
                    continue;
                }
                return Some((opcode, payload));
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout(WAIT, self.tcp.read(&mut chunk)).await {
                Ok(Ok(0) | Err(_)) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => {
                    self.silent = true;
                    return None;
                }
            }
        }
    }

    /// Opcodes of the frames until the close frame, and its code (1006 when the connection
    /// ended with no close frame, as a client reports it; 0 when nothing came within `WAIT`).
    async fn until_close(&mut self) -> (Vec<u8>, u16) {
        let mut seen = Vec::new();
        while let Some((opcode, payload)) = self.next_frame().await {
            if opcode == 0x8 {
                let code = payload.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])).unwrap_or(1005);
                return (seen, code);
            }
            seen.push(opcode);
        }
        (seen, if self.silent { 0 } else { 1006 })
    }

    /// Say `hello` and read until `up_to_date`.
    async fn hello(&mut self) {
        let token = token("store-1", "user-1", "Employee", Some("pos-1"));
        let hello = format!(r#"{{"type":"hello","id":1,"versions":[1],"token":"{token}"}}"#);
        self.tcp.write_all(&frame(0x81, hello.as_bytes())).await.unwrap();
        loop {
            let (opcode, payload) = self.next_frame().await.expect("welcome and catch-up");
            assert_eq!(opcode, 0x1, "{}", String::from_utf8_lossy(&payload));
            if String::from_utf8_lossy(&payload).contains(r#""type":"up_to_date""#) {
                return;
            }
        }
    }
}

/// One unmasked hub frame at the start of `buf`, and its length.
fn parse_server_frame(buf: &[u8]) -> Option<((u8, Vec<u8>), usize)> {
    let (b0, b1) = (*buf.first()?, *buf.get(1)?);
    let (start, len) = match b1 & 0x7f {
        126 => (4, u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize),
        127 => (10, u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize),
        n => (2, n as usize),
    };
    let payload = buf.get(start..start + len)?.to_vec();
    Some(((b0 & 0x0f, payload), start + len))
}

#[actix_web::test]
async fn bad_framing_is_closed_with_the_code_that_fits() {
    let hub = TestHub::start_with(|config| config.max_frame_bytes = 64 * 1024).await;
    let snowman = "☃".as_bytes();
    let ping = br#"{"type":"ping","id":7}"#;
    // (what, bytes, after hello, close code)
    let cases: Vec<(&str, Vec<u8>, bool, u16)> = vec![
        ("invalid UTF-8 in a text frame", frame(0x81, b"{\"type\":\"ping\",\"id\":\xff}"), false, 1007),
        ("invalid UTF-8 after hello", frame(0x81, b"\xc3\x28"), true, 1007),
        ("a text message ending inside a character", frame(0x81, &snowman[..2]), false, 1007),
        (
            "invalid UTF-8 across fragments",
            [frame(0x01, &snowman[..1]), frame(0x80, b"(")].concat(),
            true,
            1007,
        ),
        ("a close reason that is not UTF-8", frame(0x88, &[0x03, 0xe8, 0xff]), false, 1007),
        ("RSV1 on a text frame", frame(0xc1, ping), false, 1002),
        ("RSV1 after hello", frame(0xc1, ping), true, 1002),
        ("RSV2 on a binary frame", frame(0xa2, &[0x80]), false, 1002),
        ("RSV3 on a ping", frame(0x99, b""), false, 1002),
        ("an unmasked frame", frame_with(0x81, ping, false), false, 1002),
        ("an unknown opcode", frame(0x83, b""), true, 1002),
        ("a continuation with no message", frame(0x80, b"x"), false, 1002),
        ("a new message inside a fragmented one", [frame(0x01, b"{"), frame(0x81, b"}")].concat(), false, 1002),
        ("a fragmented ping", frame(0x09, b""), false, 1002),
        ("a ping over 125 bytes", frame(0x89, &[b'p'; 126]), false, 1002),
        ("a close frame of one byte", frame(0x88, &[0x03]), false, 1002),
        ("a close code a peer may not send", frame(0x88, &[0x03, 0xee]), false, 1002),
        // Told by the header: the hub need not read it all first.
        ("the header of a frame over max_frame_bytes", frame(0x82, &vec![0x90; 64 * 1024 + 1])[..64].to_vec(), false, 1009),
        ("a frame over max_frame_bytes", frame(0x82, &vec![0x90; 64 * 1024 + 1]), true, 1009),
        (
            "a message over max_frame_bytes in fragments",
            [frame(0x01, &[b' '; 40 * 1024]), frame(0x80, &[b' '; 40 * 1024])].concat(),
            true,
            1009,
        ),
    ];
    let mut wrong = Vec::new();
    for (what, bytes, after_hello, code) in cases {
        let mut socket = RawSocket::open(&hub).await;
        if after_hello {
            socket.hello().await;
        }
        socket.tcp.write_all(&bytes).await.unwrap();
        let (_, got) = socket.until_close().await;
        if got != code {
            wrong.push(format!("{what}: expected {code}, got {got}"));
        }
    }
    assert!(wrong.is_empty(), "{} wrong close codes:\n{}", wrong.len(), wrong.join("\n"));

    // A ping and a frame before the violation, in the same write, are still answered.
    let mut socket = RawSocket::open(&hub).await;
    socket.hello().await;
    let bytes = [frame(0x89, b"hi"), frame(0x81, ping), frame(0xc1, ping)].concat();
    socket.tcp.write_all(&bytes).await.unwrap();
    let (seen, code) = socket.until_close().await;
    assert_eq!((seen, code), (vec![0xa, 0x1], 1002), "a pong, the ping's pong frame, then the close");
    // The client answers the close: the hub ends the connection.
    socket.tcp.write_all(&frame(0x88, &1002u16.to_be_bytes())).await.unwrap();
    assert_eq!(socket.next_frame().await, None, "the connection ends");
    assert!(!socket.silent, "the connection ends when the client answers the close");

    // Good framing still works after all that: fragments with a ping between them.
    let mut socket = RawSocket::open(&hub).await;
    socket.hello().await;
    let bytes = [frame(0x01, &ping[..5]), frame(0x89, b""), frame(0x80, &ping[5..])].concat();
    socket.tcp.write_all(&bytes).await.unwrap();
    let (opcode, _) = socket.next_frame().await.expect("pong");
    assert_eq!(opcode, 0xa);
    let (opcode, payload) = socket.next_frame().await.expect("the ping's answer");
    assert_eq!(opcode, 0x1);
    assert!(String::from_utf8_lossy(&payload).contains(r#""type":"pong""#), "{}", String::from_utf8_lossy(&payload));
    hub.shutdown().await;
}
