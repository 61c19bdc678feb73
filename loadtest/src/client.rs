//! A protocol client over one WebSocket: connects from a chosen 127.0.0.x source address
//! (to go past one address's ephemeral ports), sends client frames, decodes server frames.

use std::net::{IpAddr, SocketAddr};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use protocol::{ClientFrame, Encoding, Position, ServerFrame};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::error::{LoadError, Result};

pub type Ws = WebSocketStream<TcpStream>;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
    pub encoding: Encoding,
    /// Source addresses to spread sockets over (empty: let the kernel choose).
    pub sources: Vec<IpAddr>,
}

impl Target {
    pub fn new(url: &str, encoding: Encoding, source_addrs: usize) -> Result<Target> {
        let rest = url.strip_prefix("ws://").ok_or_else(|| LoadError::Usage(format!("{url}: only ws:// URLs are supported")))?;
        let host_port = rest.split('/').next().unwrap_or(rest);
        let addr: SocketAddr = host_port.parse().map_err(|_| LoadError::Usage(format!("{url}: give the host as ip:port")))?;
        if !addr.ip().is_loopback() {
            return Err(LoadError::Usage(format!("{url}: load tests target loopback (127.0.0.0/8) only")));
        }
        let sources = (1..=source_addrs.min(250)).map(|i| IpAddr::from([127, 0, 0, i as u8])).collect();
        Ok(Target { url: url.to_string(), addr, encoding, sources })
    }

    /// Open WebSocket number `n` to `url` (on this target's address), from its source address.
    pub async fn connect_raw(&self, url: &str, n: usize) -> Result<Ws> {
        let stream = if self.sources.is_empty() {
            TcpStream::connect(self.addr).await?
        } else {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(self.sources[n % self.sources.len()], 0))?;
            socket.connect(self.addr).await?
        };
        stream.set_nodelay(true)?;
        let (ws, _) = tokio_tungstenite::client_async(url, stream).await.map_err(|source| LoadError::Connect { url: url.to_string(), source })?;
        Ok(ws)
    }

    /// Open protocol socket number `n`.
    pub async fn connect(&self, n: usize) -> Result<Client> {
        let ws = self.connect_raw(&self.url, n).await?;
        let (sink, stream) = ws.split();
        Ok(Client { sender: Sender { sink, encoding: self.encoding }, receiver: Receiver { stream, encoding: self.encoding } })
    }
}

pub struct Client {
    pub sender: Sender,
    pub receiver: Receiver,
}

pub struct Sender {
    sink: SplitSink<Ws, Message>,
    encoding: Encoding,
}

pub struct Receiver {
    stream: SplitStream<Ws>,
    encoding: Encoding,
}

impl Sender {
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<()> {
        let bytes = protocol::codec::encode_client(self.encoding, frame);
        let msg = match self.encoding {
            // unwrap: JSON is UTF-8.
            Encoding::Json => Message::Text(String::from_utf8(bytes).expect("JSON is UTF-8")),
            Encoding::MsgPack => Message::Binary(bytes),
        };
        self.sink.send(msg).await?;
        Ok(())
    }

    pub async fn close(&mut self) {
        let _ = self.sink.close().await;
    }
}

impl Receiver {
    /// The next frame; `Err(Closed)` when the hub closed the socket.
    pub async fn recv(&mut self) -> Result<ServerFrame> {
        loop {
            let msg = match self.stream.next().await {
                Some(msg) => msg?,
                None => return Err(LoadError::Closed { code: 1006, reason: "connection lost".into() }),
            };
            let decoded = match msg {
                Message::Text(t) => protocol::codec::decode_server(Encoding::Json, t.as_bytes()),
                Message::Binary(b) => protocol::codec::decode_server(self.encoding, &b),
                Message::Close(frame) => {
                    let (code, reason) = frame.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()));
                    return Err(LoadError::Closed { code, reason });
                }
                _ => continue,
            };
            return decoded.map_err(|e| LoadError::Protocol(e.to_string()));
        }
    }
}

impl Client {
    /// `hello` and catch-up until `up_to_date`; returns the position reached.
    pub async fn handshake(&mut self, token: String, device: &str, position: Option<Position>) -> Result<Position> {
        self.handshake_with(token, device, position, |_| {}).await
    }

    /// [`Client::handshake`], handing every catch-up page's deltas to `seen` (deliveries too).
    pub async fn handshake_with(
        &mut self,
        token: String,
        device: &str,
        position: Option<Position>,
        mut seen: impl FnMut(&[protocol::Delta]),
    ) -> Result<Position> {
        self.sender
            .send(&ClientFrame::Hello { mode: Default::default(), id: 1, versions: vec![1], token, device_id: Some(device.to_string()), position })
            .await?;
        let epoch = match self.receiver.recv().await? {
            ServerFrame::Welcome { epoch, .. } => epoch,
            ServerFrame::Error { code, message, .. } => return Err(LoadError::Refused { code: code.as_str().into(), message }),
            other => return Err(LoadError::Protocol(format!("expected welcome, got {other:?}"))),
        };
        loop {
            match self.receiver.recv().await? {
                ServerFrame::CatchUp { deltas, .. } => seen(&deltas),
                ServerFrame::UpToDate { seq } => return Ok(Position { epoch, seq }),
                ServerFrame::MustResync { epoch, head_seq, .. } => {
                    // A load generator keeps no rows: resume at the head.
                    self.sender.send(&ClientFrame::Resume { id: 2, position: Position { epoch, seq: head_seq } }).await?;
                }
                ServerFrame::Error { code, message, .. } => return Err(LoadError::Refused { code: code.as_str().into(), message }),
                other => return Err(LoadError::Protocol(format!("unexpected frame during catch-up: {other:?}"))),
            }
        }
    }
}
