//! Cluster mode: several hubs over one Postgres, linked by NATS core. This module owns the
//! NATS link: this node's id, the bounded queue of messages it publishes (in order), the
//! tenant subscriptions it hands to tenant actors, and the nodes' heartbeats, from which it
//! learns which nodes are alive.
//!
//! NATS is a hint, never the truth: a message lost (NATS core is at-most-once) or dropped here
//! is read from Postgres by the receiver, which fills any seq gap from the log before it
//! delivers past it, and every tenant re-reads its log when the link comes back. Nothing a
//! device is acknowledged waits for NATS.

pub mod subjects;
pub mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::ids::{NodeId, TenantId};
use crate::metrics::Metrics;
pub use wire::{Body, Envelope, RemoteSession, RemoteTrack};

/// Cluster events for the tenant actors, at most this many waiting.
const EVENTS: usize = 1024;
/// Used while the server has not told its own limit yet (NATS's default).
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;
/// How long a stopping node waits for its leaving message to be published.
const LEAVE_LIMIT: Duration = Duration::from_secs(1);

/// What the tenant actors must hear about the cluster as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    /// Messages may have been lost (the link came back, or this node could not keep up with
    /// a subscription): every tenant reads its log and asks for presence again.
    Resync,
    /// A node was heard from for the first time (or again after it was taken for dead): the
    /// tenants with sessions here tell it who they are.
    NodeJoined(NodeId),
    /// A node stopped or went silent: its sessions are gone.
    NodeGone(NodeId),
}

/// A message for NATS, in the publishing queue; `published` hears when it was handed to the
/// client (so that `leave` knows everything queued before it went first).
struct Outgoing {
    subject: String,
    payload: Bytes,
    published: Option<oneshot::Sender<()>>,
}

/// The link of this node to the others.
pub struct Cluster {
    node: NodeId,
    prefix: String,
    client: async_nats::Client,
    outbox: mpsc::Sender<Outgoing>,
    link: Arc<LinkState>,
    /// Set once this node said it is stopping: it sends no heartbeat after that, which would
    /// make the others count it again. (A lock, not an atomic: a heartbeat is queued while it
    /// is held, so none can be checked before and queued after the leaving message.)
    leaving: Mutex<bool>,
    /// Other nodes, with when each was last heard from.
    peers: Mutex<HashMap<NodeId, Instant>>,
    metrics: Arc<Metrics>,
    events: mpsc::Sender<ClusterEvent>,
}

/// The NATS connection's state, shared with its event callback.
#[derive(Default)]
struct LinkState {
    connected: AtomicBool,
}

impl Cluster {
    /// Connect to NATS (in the background: a hub starts, and serves, while NATS is down) and
    /// start the heartbeats. Returns the events the tenant actors must hear.
    pub async fn start(config: &Config, metrics: Arc<Metrics>) -> Result<(Arc<Cluster>, mpsc::Receiver<ClusterEvent>)> {
        let url = config.nats_url.as_deref().unwrap_or_default();
        let servers = url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<async_nats::ServerAddr>().map_err(|e| Error::Config(format!("nats_url `{s}`: {e}"))))
            .collect::<Result<Vec<_>>>()?;
        if servers.is_empty() {
            return Err(Error::Config("nats_url names no server".into()));
        }
        let node = NodeId::new(config.node_id.clone().unwrap_or_else(default_node_id));
        let (events, events_rx) = mpsc::channel(EVENTS);
        let link = Arc::new(LinkState::default());
        let callback_link = link.clone();
        let callback_events = events.clone();
        let callback_node = node.clone();
        let options = async_nats::ConnectOptions::new()
            .name(format!("synchub {node}"))
            // A node fans out its own commits itself; its own messages would only come back.
            .no_echo()
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(2))
            .ping_interval(Duration::from_millis(config.cluster_heartbeat_ms.max(500)))
            .event_callback(move |event| {
                let link = callback_link.clone();
                let events = callback_events.clone();
                let node = callback_node.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!(%node, "NATS link up");
                            link.connected.store(true, Ordering::Relaxed);
                            let _ = events.try_send(ClusterEvent::Resync);
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!(%node, "NATS link down; reading other nodes' commits from Postgres until it returns");
                            link.connected.store(false, Ordering::Relaxed);
                        }
                        async_nats::Event::SlowConsumer(_) => {
                            tracing::warn!(%node, "NATS subscription overflowed; resynchronising tenants from Postgres");
                            let _ = events.try_send(ClusterEvent::Resync);
                        }
                        other => tracing::info!(%node, event = %other, "NATS event"),
                    }
                }
            });
        let client = options.connect(servers).await.map_err(|e| Error::Config(format!("NATS: {e}")))?;
        let (outbox, outbox_rx) = mpsc::channel(config.cluster_publish_queue);
        let cluster = Arc::new(Cluster { node, prefix: config.cluster_subject_prefix.clone(), client, outbox, link, leaving: Mutex::new(false), peers: Mutex::new(HashMap::new()), metrics, events });
        tokio::spawn(publish_in_order(cluster.client.clone(), outbox_rx, cluster.metrics.clone()));
        tokio::spawn(heartbeats(cluster.clone(), Duration::from_millis(config.cluster_heartbeat_ms), Duration::from_millis(config.cluster_node_timeout_ms)));
        tracing::info!(node = %cluster.node, nats = %url, "cluster mode");
        Ok((cluster, events_rx))
    }

    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// Whether the NATS link is up.
    pub fn connected(&self) -> bool {
        self.link.connected.load(Ordering::Relaxed)
    }

    /// Nodes alive as far as this one knows, itself included.
    pub fn live_nodes(&self) -> usize {
        self.peers.lock().map(|p| p.len()).unwrap_or(0) + 1
    }

    /// Whether `node` was heard from within `cluster_node_timeout_ms`.
    pub fn is_alive(&self, node: &NodeId) -> bool {
        self.peers.lock().map(|p| p.contains_key(node)).unwrap_or(false)
    }

    /// Queue a message about `tenant` for the other nodes. Never waits: when the link is down
    /// or the queue is full it is dropped and counted (receivers read what it carried from
    /// Postgres, and a link that comes back resynchronises every tenant).
    pub fn publish(&self, tenant: &TenantId, body: Body<'_>) {
        let mut envelope = Envelope::new(&self.node, body);
        let mut bytes = envelope.encode();
        if bytes.len() > self.max_payload() {
            if let Body::Deltas { deltas, .. } = &mut envelope.body {
                // Too large for one NATS message: the others read these seqs from the log.
                *deltas = None;
                bytes = envelope.encode();
            }
        }
        self.enqueue(subjects::tenant(&self.prefix, tenant), bytes);
    }

    fn enqueue(&self, subject: String, bytes: Vec<u8>) {
        let message = Outgoing { subject, payload: Bytes::from(bytes), published: None };
        if !self.connected() || self.outbox.try_send(message).is_err() {
            self.metrics.cluster_publish_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn max_payload(&self) -> usize {
        match self.client.server_info().max_payload {
            0 => DEFAULT_MAX_PAYLOAD,
            // Room for the protocol line NATS counts with the payload.
            n => n.saturating_sub(1024),
        }
    }

    /// The messages of other nodes about `tenant`, while the stream is held (dropping it
    /// unsubscribes). Messages that do not decode are logged and skipped.
    pub async fn subscribe(&self, tenant: &TenantId) -> Result<impl Stream<Item = Envelope<'static>> + Unpin + 'static> {
        let subscriber = self
            .client
            .subscribe(subjects::tenant(&self.prefix, tenant))
            .await
            .map_err(|e| Error::Internal(format!("NATS subscribe: {e}")))?;
        let metrics = self.metrics.clone();
        Ok(subscriber.filter_map(move |message| {
            metrics.cluster_received.fetch_add(1, Ordering::Relaxed);
            let decoded = Envelope::decode(&message.payload);
            if let Err(err) = &decoded {
                tracing::warn!(subject = %message.subject, %err, "skipping a cluster message");
            }
            std::future::ready(decoded.ok())
        }))
    }

    /// Ask the node holding a session (whichever it is) and wait up to `wait` for its answer;
    /// `None` when no node answered (no node holds it, or NATS is down).
    pub async fn ask_session_holder(&self, body: Body<'_>, wait: Duration) -> Option<Envelope<'static>> {
        let bytes = Bytes::from(Envelope::new(&self.node, body).encode());
        let request = self.client.request(subjects::session_control(&self.prefix), bytes);
        match tokio::time::timeout(wait, request).await {
            Ok(Ok(message)) => Envelope::decode(&message.payload).ok(),
            _ => None,
        }
    }

    /// Requests of other nodes about sessions, each with where to answer.
    pub async fn session_requests(&self) -> Result<impl Stream<Item = (Envelope<'static>, async_nats::Subject)> + Unpin + 'static> {
        let subscriber = self
            .client
            .subscribe(subjects::session_control(&self.prefix))
            .await
            .map_err(|e| Error::Internal(format!("NATS subscribe: {e}")))?;
        Ok(subscriber.filter_map(|message| std::future::ready(message.reply.and_then(|reply| Envelope::decode(&message.payload).ok().map(|e| (e, reply))))))
    }

    /// Answer a request of another node.
    pub async fn answer(&self, reply: async_nats::Subject, body: Body<'_>) {
        let bytes = Bytes::from(Envelope::new(&self.node, body).encode());
        if let Err(err) = self.client.publish(reply, bytes).await {
            tracing::warn!(%err, "cannot answer a cluster request");
        }
    }

    /// Tell the other nodes this one is stopping, and give the message a moment to leave.
    /// It goes through the publishing queue, behind whatever is queued (a heartbeat that
    /// followed it would make the others count this node again), and no heartbeat follows.
    pub async fn leave(&self) {
        if let Ok(mut leaving) = self.leaving.lock() {
            *leaving = true;
        }
        if !self.connected() {
            return;
        }
        let (published, sent) = oneshot::channel();
        let payload = Bytes::from(Envelope::new(&self.node, Body::Leaving).encode());
        let message = Outgoing { subject: subjects::nodes(&self.prefix), payload, published: Some(published) };
        let queued_and_published = async {
            if self.outbox.send(message).await.is_ok() {
                let _ = sent.await;
            }
            let _ = self.client.flush().await;
        };
        let _ = tokio::time::timeout(LEAVE_LIMIT, queued_and_published).await;
    }

    fn heard_from(&self, node: NodeId) {
        let fresh = self.peers.lock().map(|mut p| p.insert(node.clone(), Instant::now()).is_none()).unwrap_or(false);
        if fresh {
            tracing::info!(node = %self.node, peer = %node, "node joined the cluster");
            self.tell(ClusterEvent::NodeJoined(node));
        }
    }

    fn gone(&self, node: &NodeId, why: &str) {
        let known = self.peers.lock().map(|mut p| p.remove(node).is_some()).unwrap_or(false);
        if known {
            tracing::warn!(node = %self.node, peer = %node, why, "node left the cluster");
            self.tell(ClusterEvent::NodeGone(node.clone()));
        }
    }

    fn tell(&self, event: ClusterEvent) {
        if self.events.try_send(event).is_err() {
            // Full only if the tenants fall far behind; a resync covers what was left out.
            tracing::warn!("cluster events queue full");
        }
    }
}

/// Hand queued messages to NATS one at a time, so that they leave in the order they were
/// queued (NATS keeps a publisher's order).
async fn publish_in_order(client: async_nats::Client, mut outbox: mpsc::Receiver<Outgoing>, metrics: Arc<Metrics>) {
    while let Some(Outgoing { subject, payload, published }) = outbox.recv().await {
        let outcome = client.publish(subject, payload).await;
        if let Some(published) = published {
            let _ = published.send(());
        }
        match outcome {
            Ok(()) => {
                metrics.cluster_published.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => {
                metrics.cluster_publish_dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%err, "cannot publish a cluster message");
            }
        }
    }
}

/// Say this node is alive every `every`, listen to the others, and take a node silent for
/// `timeout` for dead.
async fn heartbeats(cluster: Arc<Cluster>, every: Duration, timeout: Duration) {
    let subject = subjects::nodes(&cluster.prefix);
    let mut listening = loop {
        match cluster.client.subscribe(subject.clone()).await {
            Ok(subscriber) => break subscriber,
            Err(err) => {
                tracing::warn!(%err, "cannot subscribe to the nodes' heartbeats; retrying");
                tokio::time::sleep(every).await;
            }
        }
    };
    let heartbeat = Envelope::new(&cluster.node, Body::Heartbeat).encode();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if cluster.connected() {
                    let Ok(leaving) = cluster.leaving.lock() else { continue };
                    if *leaving {
                        continue;
                    }
                    cluster.enqueue(subject.clone(), heartbeat.clone());
                } else {
                    // Cut off from NATS, this node cannot tell a dead peer from a silent link:
                    // presence stays as it was, and peers that do not come back with the link
                    // are taken for dead a timeout after it returns.
                    if let Ok(mut peers) = cluster.peers.lock() {
                        peers.values_mut().for_each(|heard| *heard = Instant::now());
                    }
                    continue;
                }
                let silent: Vec<NodeId> = cluster
                    .peers
                    .lock()
                    .map(|p| p.iter().filter(|(_, heard)| heard.elapsed() > timeout).map(|(n, _)| n.clone()).collect())
                    .unwrap_or_default();
                for node in silent {
                    cluster.gone(&node, "no heartbeat");
                }
            }
            message = listening.next() => {
                let Some(message) = message else { return };
                cluster.metrics.cluster_received.fetch_add(1, Ordering::Relaxed);
                let Ok(envelope) = Envelope::decode(&message.payload) else { continue };
                let node = NodeId::new(envelope.node);
                if node == cluster.node {
                    continue;
                }
                match envelope.body {
                    Body::Leaving => cluster.gone(&node, "stopping"),
                    _ => cluster.heard_from(node),
                }
            }
        }
    }
}

/// The host name and a random suffix: a restarted node is a new node, so that the others
/// never mistake its fresh sessions for the dead one's.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').take(40).collect();
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    if host.is_empty() {
        format!("node-{suffix}")
    } else {
        format!("{host}-{suffix}")
    }
}
