//! Cluster mode, for a tenant's actor: what it tells the other nodes (its commits' deltas,
//! its sessions, their topic presence, broadcasts and conflict news) and what it does with what
//! they tell it (their deltas into the tenant's one order, their sessions into presence, a
//! device's newer session elsewhere replacing its session here).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use protocol::{Delta, PresenceEntry};

use super::{RemoteNode, Subscription, TenantActor};
use crate::actors::messages::{Broadcast, ClusterNews, ConflictNews, SessionControl, Topic};
use crate::cluster::{Body, ClusterEvent, Envelope, RemoteSession, RemoteTrack};
use crate::error::Result;
use crate::ids::{NodeId, Seq, SessionId};

/// Cluster mode: what this tenant's actor tells the other nodes, and what it does with what
/// they tell it.
impl TenantActor {
    pub(super) fn publish(&self, body: Body<'_>) {
        if let Some(cluster) = &self.cluster {
            cluster.publish(&self.tenant, body);
        }
    }

    /// A group's deltas, encoded once for every other node.
    pub(super) fn publish_deltas(&self, deltas: &[Delta]) {
        let (Some(first), Some(last)) = (deltas.first(), deltas.last()) else { return };
        if self.cluster.is_some() {
            let committed_ms = crate::actors::sweep::unix_ms();
            self.publish(Body::Deltas { first: first.seq, last: last.seq, committed_ms, deltas: Some(Cow::Borrowed(deltas)) });
        }
    }

    pub(super) fn publish_track(&self, session: SessionId, topic: &Topic, key: &str, meta: Option<&serde_json::Map<String, serde_json::Value>>) {
        if self.cluster.is_some() {
            let meta = meta.map(|m| serde_json::Value::Object(m.clone()).to_string());
            self.publish(Body::Track(RemoteTrack { session, topic: topic.name.to_string(), private: topic.private, key: key.to_owned(), meta }));
        }
    }

    /// Every session of this node, and what they tracked, for the other nodes.
    fn publish_snapshot(&self) {
        if self.sessions.is_empty() {
            return;
        }
        let sessions = self.sessions.iter().map(|(id, s)| RemoteSession { entry: s.presence(*id), exclusive: s.exclusive }).collect();
        let local = &self.sessions;
        let tracked = self
            .topics
            .tracked_by(|session| local.contains_key(&session))
            .into_iter()
            .map(|t| RemoteTrack {
                session: t.session,
                topic: t.topic.name.to_string(),
                private: t.topic.private,
                key: t.key.to_string(),
                meta: Some(serde_json::Value::Object(t.meta).to_string()),
            })
            .collect();
        self.publish(Body::PresenceSnapshot { sessions, tracked });
    }

    pub(super) fn follow_cluster(&mut self, subscription: Result<impl futures_util::Stream<Item = Envelope<'static>> + 'static>, ctx: &mut Context<Self>) {
        match subscription {
            Ok(stream) => {
                ctx.add_stream(stream);
                self.subscription = Subscription::Held;
                self.publish(Body::PresenceAsk);
            }
            Err(err) => {
                tracing::warn!(tenant = %self.tenant, %err, "cannot subscribe to the tenant's cluster subject; retrying");
                self.subscription = Subscription::Off;
            }
        }
    }

    pub(super) fn cluster_tick(&mut self, ctx: &mut Context<Self>) {
        let Some(cluster) = self.cluster.clone() else { return };
        if self.subscription == Subscription::Off {
            self.subscription = Subscription::Taking;
            let tenant = self.tenant.clone();
            let subscribe = async move { cluster.subscribe(&tenant).await };
            ctx.spawn(subscribe.into_actor(self).map(|subscription, actor, ctx| {
                actor.follow_cluster(subscription, ctx);
                // What was committed while no subscription was held.
                actor.log_dirty = true;
            }));
            return;
        }
        // Sessions of a node that died before this one heard any heartbeat of it.
        let timeout = Duration::from_millis(self.config.cluster_node_timeout_ms);
        let silent: Vec<NodeId> =
            self.remote.iter().filter(|(node, known)| known.heard.elapsed() > timeout && !cluster.is_alive(node)).map(|(node, _)| node.clone()).collect();
        for node in silent {
            self.forget_node(&node);
        }
    }

    /// Another node's sessions joined or left.
    fn remote_presence(&mut self, node: NodeId, joins: Vec<RemoteSession>, leaves: Vec<SessionId>) {
        let known = self.remote.entry(node).or_insert_with(|| RemoteNode { heard: Instant::now(), sessions: HashMap::new() });
        known.heard = Instant::now();
        let left: Vec<PresenceEntry> = leaves.iter().filter_map(|id| known.sessions.remove(id)).map(|s| s.entry).collect();
        let mut joined = Vec::with_capacity(joins.len());
        let mut replaced = Vec::new();
        for session in joins {
            if session.exclusive {
                // One live session per device across the cluster: the newer replaces the older.
                let device = session.entry.device_id.as_str();
                let since = session.entry.since_ms;
                replaced.extend(self.sessions.iter().filter(|(_, s)| s.exclusive && s.device.as_str() == device && s.since_ms <= since).map(|(id, _)| *id));
            }
            joined.push(session.entry.clone());
            known.sessions.insert(session.entry.session_id, session);
        }
        let untracked = self.topics.forget_remote(&leaves);
        self.deliver_topic_events(untracked);
        for id in &replaced {
            if let Some(old) = self.sessions.get(id) {
                let _ = old.link.session.try_control(SessionControl::Replaced);
            }
        }
        self.remove_sessions(replaced);
        self.announce_presence(joined, left);
    }

    /// Another node's whole list: it replaces what was known of that node.
    fn remote_snapshot(&mut self, node: NodeId, sessions: Vec<RemoteSession>, tracked: Vec<RemoteTrack>) {
        let before: Vec<SessionId> = self.remote.get(&node).map(|k| k.sessions.keys().copied().collect()).unwrap_or_default();
        let gone: Vec<SessionId> = before.into_iter().filter(|id| !sessions.iter().any(|s| s.entry.session_id == *id)).collect();
        let new: Vec<RemoteSession> = sessions
            .into_iter()
            .filter(|s| !self.remote.get(&node).is_some_and(|k| k.sessions.contains_key(&s.entry.session_id)))
            .collect();
        self.remote_presence(node, new, gone);
        for track in tracked {
            self.remote_track(track);
        }
    }

    fn remote_track(&mut self, track: RemoteTrack) {
        let meta = match track.meta.as_deref().map(serde_json::from_str::<serde_json::Value>) {
            None => None,
            Some(Ok(serde_json::Value::Object(meta))) => Some(meta),
            Some(_) => return,
        };
        let topic = Topic { name: Arc::from(track.topic), private: track.private };
        let deliveries = self.topics.track_remote(track.session, &topic, Arc::from(track.key), meta);
        self.deliver_topic_events(deliveries);
    }

    /// A node is gone: its sessions leave.
    fn forget_node(&mut self, node: &NodeId) {
        let Some(known) = self.remote.remove(node) else { return };
        let ids: Vec<SessionId> = known.sessions.keys().copied().collect();
        let untracked = self.topics.forget_remote(&ids);
        self.deliver_topic_events(untracked);
        self.announce_presence(Vec::new(), known.sessions.into_values().map(|s| s.entry).collect());
    }

    fn remote_deltas(&mut self, last: Seq, committed_ms: u64, deltas: Option<Vec<Delta>>, ctx: &mut Context<Self>) {
        let lag = crate::actors::sweep::unix_ms().saturating_sub(committed_ms);
        self.metrics.cluster_lag_ms_sum.fetch_add(lag, Ordering::Relaxed);
        self.metrics.cluster_lag_count.fetch_add(1, Ordering::Relaxed);
        self.last_activity = Instant::now();
        match deltas {
            Some(deltas) => {
                self.metrics.cluster_deltas_received.fetch_add(deltas.len() as u64, Ordering::Relaxed);
                self.accept(deltas, ctx);
            }
            // Too large to travel: read from the log.
            None if last > self.fanned => self.read_log(ctx),
            None => {}
        }
    }
}

impl StreamHandler<Envelope<'static>> for TenantActor {
    fn handle(&mut self, envelope: Envelope<'static>, ctx: &mut Context<Self>) {
        let node = NodeId::new(envelope.node);
        match envelope.body {
            Body::Deltas { last, committed_ms, deltas, .. } => self.remote_deltas(last, committed_ms, deltas.map(Cow::into_owned), ctx),
            Body::Presence { joins, leaves } => self.remote_presence(node, joins, leaves),
            Body::PresenceSnapshot { sessions, tracked } => self.remote_snapshot(node, sessions, tracked),
            Body::PresenceAsk => self.publish_snapshot(),
            Body::Track(track) => self.remote_track(track),
            Body::Broadcast { channel, event, payload, private, from } => {
                let Ok(payload) = serde_json::from_str(&payload) else { return };
                self.deliver_broadcast(Broadcast { channel, event, payload, private, from });
            }
            Body::Conflicts { events, open } => self.tell_conflicts(ConflictNews { events, open }, false),
            Body::Heartbeat | Body::Leaving | Body::RefreshToken { .. } | Body::Refreshed { .. } => {}
        }
    }

    /// The subscription ended (the client closed): the tick takes it again.
    fn finished(&mut self, _ctx: &mut Context<Self>) {
        self.subscription = Subscription::Off;
    }
}

impl Handler<ClusterNews> for TenantActor {
    type Result = ();

    fn handle(&mut self, msg: ClusterNews, ctx: &mut Context<Self>) {
        match msg.0 {
            ClusterEvent::Resync => {
                // Whatever NATS lost: seqs from the log, presence from the nodes.
                self.read_log(ctx);
                self.publish(Body::PresenceAsk);
                self.publish_snapshot();
            }
            ClusterEvent::NodeJoined(_) => self.publish_snapshot(),
            ClusterEvent::NodeGone(node) => self.forget_node(&node),
        }
    }
}
