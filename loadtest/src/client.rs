//! A protocol client over one WebSocket: connects from a chosen 127.0.0.x source address
//! (to go past one address's ephemeral ports), sends client frames, decodes server frames.

use std::net::{IpAddr, SocketAddr};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use protocol::{ClientFrame, Encoding, Position, ServerFrame};
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{http, Message};
use tokio_tungstenite::WebSocketStream;

use crate::error::{LoadError, Result};

/// How long a client waits, unless told otherwise (`--answer-timeout-secs`), for the hub to
/// accept its socket and then to answer its `hello`: every run stops by itself, even against a
/// hub that stopped answering.
pub const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub type Ws = WebSocketStream<TcpStream>;

/// One hub node: its WebSocket URL and the address it listens on.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub url: String,
    pub addr: SocketAddr,
}

impl Node {
    fn parse(url: &str) -> Result<Node> {
        let rest = url.strip_prefix("ws://").ok_or_else(|| LoadError::Usage(format!("{url}: only ws:// URLs are supported")))?;
        let host_port = rest.split('/').next().unwrap_or(rest);
        let addr: SocketAddr = host_port.parse().map_err(|_| LoadError::Usage(format!("{url}: give the host as ip:port")))?;
        if !addr.ip().is_loopback() {
            return Err(LoadError::Usage(format!("{url}: load tests target loopback (127.0.0.0/8) only")));
        }
        Ok(Node { url: url.to_string(), addr })
    }
}

/// Where and how to connect.
///
/// A target is one hub or several nodes of a cluster: `--url` takes a comma-separated list,
/// and client socket number `n` goes to node `n % nodes` (see [`Target::node_index`]), so every
/// scenario spreads its clients over the nodes the same way, whatever it numbers them by.
#[derive(Debug, Clone)]
pub struct Target {
    /// The first node's URL and address (the only ones, with one node).
    pub url: String,
    pub addr: SocketAddr,
    /// Every node, the first included; never empty.
    pub nodes: Vec<Node>,
    pub encoding: Encoding,
    /// Source addresses to spread sockets over (empty: let the kernel choose).
    pub sources: Vec<IpAddr>,
    /// See [`ANSWER_TIMEOUT`].
    pub answer_timeout: std::time::Duration,
}

impl Target {
    /// `url` is one WebSocket URL, or several separated by commas (the nodes of a cluster).
    pub fn new(url: &str, encoding: Encoding, source_addrs: usize) -> Result<Target> {
        let nodes = url.split(',').map(str::trim).filter(|u| !u.is_empty()).map(Node::parse).collect::<Result<Vec<_>>>()?;
        let first = nodes.first().cloned().ok_or_else(|| LoadError::Usage("--url: give at least one ws:// URL".into()))?;
        let sources = (1..=source_addrs.min(250)).map(|i| IpAddr::from([127, 0, 0, i as u8])).collect();
        Ok(Target { url: first.url, addr: first.addr, nodes, encoding, sources, answer_timeout: ANSWER_TIMEOUT })
    }

    /// The node client socket number `n` connects to: `n % nodes`.
    pub fn node_index(&self, n: usize) -> usize {
        n % self.nodes.len().max(1)
    }

    /// The node of client socket number `n` (see [`Target::node_index`]).
    pub fn node(&self, n: usize) -> &Node {
        &self.nodes[self.node_index(n)]
    }

    /// The WebSocket URL of client socket number `n`'s node.
    pub fn url_of(&self, n: usize) -> &str {
        &self.node(n).url
    }

    /// Open WebSocket number `n` to `url`, which must be on socket `n`'s node (see
    /// [`Target::url_of`]; another path or query on it is fine), from its source address.
    pub async fn connect_raw(&self, url: &str, n: usize) -> Result<Ws> {
        self.connect_raw_with(url, n, None).await
    }

    /// [`Target::connect_raw`], sending `bearer` (a token) in the upgrade request's
    /// `Authorization` header; a hub that does not accept within the answer timeout is an error.
    async fn connect_raw_with(&self, url: &str, n: usize, bearer: Option<&str>) -> Result<Ws> {
        tokio::time::timeout(self.answer_timeout, self.open_ws(url, n, bearer))
            .await
            .map_err(|_| LoadError::Timeout(self.answer_timeout, "connect and upgrade"))?
    }

    async fn open_ws(&self, url: &str, n: usize, bearer: Option<&str>) -> Result<Ws> {
        let connect_error = |source| LoadError::Connect { url: url.to_string(), source };
        let mut request = url.into_client_request().map_err(connect_error)?;
        if let Some(token) = bearer {
            let value = format!("Bearer {token}").parse().map_err(|_| LoadError::Usage("the token is not a valid header value".into()))?;
            request.headers_mut().insert(http::header::AUTHORIZATION, value);
        }
        let addr = self.node(n).addr;
        let stream = if self.sources.is_empty() {
            TcpStream::connect(addr).await?
        } else {
            let socket = TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(self.sources[n % self.sources.len()], 0))?;
            socket.connect(addr).await?
        };
        stream.set_nodelay(true)?;
        let (ws, _) = tokio_tungstenite::client_async(request, stream).await.map_err(connect_error)?;
        Ok(ws)
    }

    /// Open protocol socket number `n`, on its node.
    pub async fn connect(&self, n: usize) -> Result<Client> {
        Ok(self.client(self.connect_raw(self.url_of(n), n).await?))
    }

    /// Open protocol socket number `n`, authenticated with the upgrade request (its `hello`
    /// then needs no token).
    pub async fn connect_authorized(&self, n: usize, token: &str) -> Result<Client> {
        Ok(self.client(self.connect_raw_with(self.url_of(n), n, Some(token)).await?))
    }

    fn client(&self, ws: Ws) -> Client {
        let (sink, stream) = ws.split();
        Client { sender: Sender { sink, encoding: self.encoding }, receiver: Receiver { stream, encoding: self.encoding, answer_timeout: self.answer_timeout } }
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
    answer_timeout: std::time::Duration,
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

/// What a simulated device reads of each delta: enough to count it and to time it by its
/// change id. The rest (key, row, old values) is skipped unparsed: a real device spends that
/// on its own CPU, while the load generator shares the hub's cores and would slow it down.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DeltaHead {
    pub seq: u64,
    #[serde(default)]
    pub change_id: Option<uuid::Uuid>,
}

/// A server frame as [`Receiver::recv_heads`] reads it.
#[derive(Debug)]
pub enum Received {
    /// A live `delta` frame or a `catch_up` page, read as delta heads.
    Deltas { catch_up: bool, deltas: Vec<DeltaHead> },
    Frame(ServerFrame),
}

#[derive(Deserialize)]
struct DeltaHeads {
    deltas: Vec<DeltaHead>,
}

/// `Some(catch_up)` for a `delta` or `catch_up` frame whose first key is `type`, as the hub
/// encodes them (compact JSON, or a MessagePack map); `None` for anything else.
fn delta_frame_kind(encoding: Encoding, bytes: &[u8]) -> Option<bool> {
    let (rest, delta, catch_up): (&[u8], &[u8], &[u8]) = match encoding {
        Encoding::Json => (bytes, br#"{"type":"delta""#, br#"{"type":"catch_up""#),
        Encoding::MsgPack => {
            let header = match bytes.first()? {
                0x80..=0x8f => 1,
                0xde => 3,
                0xdf => 5,
                _ => return None,
            };
            (bytes.get(header..)?, b"\xa4type\xa5delta", b"\xa4type\xa8catch_up")
        }
    };
    if rest.starts_with(delta) {
        Some(false)
    } else if rest.starts_with(catch_up) {
        Some(true)
    } else {
        None
    }
}

/// Decode a frame; with `heads_only`, delta frames as [`Received::Deltas`].
fn decode(encoding: Encoding, bytes: &[u8], heads_only: bool) -> Result<Received> {
    if let Some(catch_up) = delta_frame_kind(encoding, bytes).filter(|_| heads_only) {
        let heads: DeltaHeads = protocol::codec::decode_value(encoding, bytes).map_err(LoadError::Protocol)?;
        return Ok(Received::Deltas { catch_up, deltas: heads.deltas });
    }
    protocol::codec::decode_server(encoding, bytes).map(Received::Frame).map_err(|e| LoadError::Protocol(e.to_string()))
}

impl Receiver {
    /// The next frame; `Err(Closed)` when the hub closed the socket.
    pub async fn recv(&mut self) -> Result<ServerFrame> {
        match self.next(false).await? {
            Received::Frame(frame) => Ok(frame),
            Received::Deltas { .. } => unreachable!("decoded whole"),
        }
    }

    /// The next frame, delta frames as their deltas' heads only (see [`DeltaHead`]).
    pub async fn recv_heads(&mut self) -> Result<Received> {
        self.next(true).await
    }

    async fn next(&mut self, heads_only: bool) -> Result<Received> {
        loop {
            let msg = match self.stream.next().await {
                Some(msg) => msg?,
                None => return Err(LoadError::Closed { code: 1006, reason: "connection lost".into() }),
            };
            return match msg {
                Message::Text(t) => decode(Encoding::Json, t.as_bytes(), heads_only),
                Message::Binary(b) => decode(self.encoding, &b, heads_only),
                Message::Close(frame) => {
                    let (code, reason) = frame.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()));
                    Err(LoadError::Closed { code, reason })
                }
                _ => continue,
            };
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
        let wait = self.receiver.answer_timeout;
        let welcome = tokio::time::timeout(wait, self.receiver.recv()).await;
        let epoch = match welcome.map_err(|_| LoadError::Timeout(wait, "hello"))?? {
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

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{Delta, Op};
    use serde_json::json;

    fn delta(seq: u64, change_id: Option<uuid::Uuid>) -> Delta {
        Delta {
            seq,
            table: "products".into(),
            op: Op::Upsert,
            key: json!({"id": 7}).as_object().cloned().unwrap(),
            row: json!({"id": 7, "name": "Tea", "tags": ["a", {"b": [1, 2.5, null]}]}).as_object().cloned(),
            old: json!({"name": "Coffee"}).as_object().cloned(),
            origin: Some("pos-1".into()),
            change_id,
            left: false,
        }
    }

    #[test]
    fn one_url_is_one_node_as_before() {
        let target = Target::new("ws://127.0.0.1:8080/v1/ws", Encoding::Json, 0).unwrap();
        assert_eq!(target.url, "ws://127.0.0.1:8080/v1/ws");
        assert_eq!(target.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(target.nodes.len(), 1);
        for n in [0, 1, 7, 100_000, 200_003] {
            assert_eq!(target.node_index(n), 0);
            assert_eq!(target.url_of(n), "ws://127.0.0.1:8080/v1/ws");
        }
    }

    #[test]
    fn several_urls_spread_client_n_over_node_n_mod_len() {
        let target = Target::new("ws://127.0.0.1:8001/v1/ws, ws://127.0.0.1:8002/v1/ws,ws://127.0.0.2:8003/v1/ws", Encoding::MsgPack, 4).unwrap();
        let ports: Vec<u16> = target.nodes.iter().map(|n| n.addr.port()).collect();
        assert_eq!(ports, [8001, 8002, 8003]);
        // The first node stays the target's own URL and address (scenarios that use one node).
        assert_eq!((target.url.as_str(), target.addr.port()), ("ws://127.0.0.1:8001/v1/ws", 8001));
        let spread: Vec<u16> = (0..7).map(|n| target.node(n).addr.port()).collect();
        assert_eq!(spread, [8001, 8002, 8003, 8001, 8002, 8003, 8001]);
        assert_eq!(target.url_of(4), "ws://127.0.0.1:8002/v1/ws");
        // Every node gets its share of any run of consecutive clients: 3,000 over 3 nodes.
        let mut counts = [0; 3];
        for n in 100_000..103_000 {
            counts[target.node_index(n)] += 1;
        }
        assert_eq!(counts, [1000, 1000, 1000]);
        // A trailing comma is no node; an empty list, a non-loopback or non-ws node is refused.
        assert_eq!(Target::new("ws://127.0.0.1:1/a,", Encoding::Json, 0).unwrap().nodes.len(), 1);
        assert!(Target::new(",", Encoding::Json, 0).is_err());
        assert!(Target::new("ws://127.0.0.1:1/a,ws://10.0.0.1:2/a", Encoding::Json, 0).is_err());
        assert!(Target::new("ws://127.0.0.1:1/a,wss://127.0.0.1:2/a", Encoding::Json, 0).is_err());
    }

    #[tokio::test]
    async fn sockets_connect_to_their_own_node() {
        // Three listeners stand in for three nodes; each counts the sockets it accepts.
        let mut listeners = Vec::new();
        for _ in 0..3 {
            listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let urls: Vec<String> = listeners.iter().map(|l| format!("ws://{}/v1/ws", l.local_addr().unwrap())).collect();
        let mut target = Target::new(&urls.join(","), Encoding::Json, 0).unwrap();
        target.answer_timeout = std::time::Duration::from_millis(200);
        // Upgrades are never answered: the connects time out, after the TCP connect landed.
        for n in 0..5 {
            assert!(target.connect(n).await.is_err());
        }
        let mut accepted = Vec::new();
        for listener in &listeners {
            let mut count = 0;
            while let Ok(Ok(_)) = tokio::time::timeout(std::time::Duration::from_millis(50), listener.accept()).await {
                count += 1;
            }
            accepted.push(count);
        }
        assert_eq!(accepted, [2, 2, 1]);
    }

    #[test]
    fn delta_frames_read_as_heads_match_the_whole_decoding() {
        let id = uuid::Uuid::now_v7();
        let frames = [
            (false, ServerFrame::Delta { deltas: vec![delta(5, Some(id)), delta(6, None)], seq: 6 }),
            (true, ServerFrame::CatchUp { deltas: vec![delta(5, Some(id)), delta(6, None)], seq: 6, head_seq: 9 }),
        ];
        for encoding in [Encoding::Json, Encoding::MsgPack] {
            for (catch_up, frame) in &frames {
                let bytes = protocol::codec::encode_server(encoding, frame);
                assert_eq!(delta_frame_kind(encoding, &bytes), Some(*catch_up), "{encoding:?}");
                match decode(encoding, &bytes, true).unwrap() {
                    Received::Deltas { catch_up: c, deltas } => {
                        assert_eq!(c, *catch_up);
                        assert_eq!(deltas, vec![DeltaHead { seq: 5, change_id: Some(id) }, DeltaHead { seq: 6, change_id: None }]);
                    }
                    other => panic!("{encoding:?}: {other:?}"),
                }
                // Without heads_only, the same bytes decode whole.
                assert!(matches!(decode(encoding, &bytes, false).unwrap(), Received::Frame(f) if &f == frame));
            }
        }
    }

    #[test]
    fn other_frames_and_other_key_orders_decode_whole() {
        for encoding in [Encoding::Json, Encoding::MsgPack] {
            let bytes = protocol::codec::encode_server(encoding, &ServerFrame::UpToDate { seq: 3 });
            assert_eq!(delta_frame_kind(encoding, &bytes), None);
            assert!(matches!(decode(encoding, &bytes, true).unwrap(), Received::Frame(ServerFrame::UpToDate { seq: 3 })));
        }
        // `type` not first: not recognised, decoded whole (and still a delta frame).
        let reordered = br#"{"seq":6,"type":"delta","deltas":[]}"#;
        assert_eq!(delta_frame_kind(Encoding::Json, reordered), None);
        assert!(matches!(decode(Encoding::Json, reordered, true).unwrap(), Received::Frame(ServerFrame::Delta { seq: 6, .. })));
    }
}
