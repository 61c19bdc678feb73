//! The tenant's topics (channels that sessions join by name, as Supabase Realtime's): which
//! sessions joined each, who receives its broadcasts, and its presence (what each session
//! tracked under which key). Pure state kept by the tenant actor, which delivers the events
//! these methods return; every payload is rendered once, however many members receive it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use protocol::PresenceEntry;
use serde_json::{Map, Value};

use super::messages::{Topic, TopicEvent, TopicEventKind};
use crate::ids::SessionId;

/// Events for sessions: who gets which.
pub type Deliveries = Vec<(SessionId, Arc<TopicEvent>)>;

/// A session's presence on a topic, as another node is told of it.
pub struct TrackedPresence {
    pub session: SessionId,
    pub topic: Topic,
    pub key: Arc<str>,
    pub meta: Map<String, Value>,
}

#[derive(Default)]
pub struct Topics {
    topics: HashMap<Topic, TopicState>,
    /// The topics each session joined, so that a session that goes leaves them all.
    by_session: HashMap<SessionId, Vec<Topic>>,
    /// Numbers presence refs (`phx_ref`), unique within the actor's life.
    next_ref: u64,
    /// The public topic whose presence also lists the tenant's sessions (native devices,
    /// dashboards, RxDB and Supabase sockets), keyed by session id.
    sessions_topic: Option<Arc<str>>,
}

#[derive(Default)]
struct TopicState {
    members: HashMap<SessionId, Member>,
    /// Tracked presences by key, oldest first within a key.
    presences: BTreeMap<Arc<str>, Vec<Tracked>>,
}

struct Member {
    receive_own: bool,
    presence: bool,
    /// A presence event could not be delivered: the whole state goes out again.
    stale: bool,
}

struct Tracked {
    session: SessionId,
    phx_ref: String,
    meta: Map<String, Value>,
}

impl Tracked {
    fn meta_json(&self, previous_ref: Option<&str>) -> Value {
        let mut meta = self.meta.clone();
        meta.insert("phx_ref".into(), Value::String(self.phx_ref.clone()));
        if let Some(previous) = previous_ref {
            meta.insert("phx_ref_prev".into(), Value::String(previous.to_owned()));
        }
        Value::Object(meta)
    }
}

/// Presence entries by key, as Phoenix sends them: `{key: {"metas": [meta, ...]}}`.
#[derive(Default)]
struct PresenceMap(Map<String, Value>);

impl PresenceMap {
    fn add(&mut self, key: &str, meta: Value) {
        let entry = self.0.entry(key.to_owned()).or_insert_with(|| serde_json::json!({"metas": []}));
        if let Some(metas) = entry.get_mut("metas").and_then(Value::as_array_mut) {
            metas.push(meta);
        }
    }

    fn session(&mut self, entry: &PresenceEntry) {
        let meta = serde_json::json!({
            "phx_ref": entry.session_id.to_string(),
            "device_id": entry.device_id,
            "user_id": entry.user_id,
            "role": entry.role,
            "mode": entry.mode,
            "since_ms": entry.since_ms,
        });
        self.add(&entry.session_id.to_string(), meta);
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn diff_json(joins: PresenceMap, leaves: PresenceMap) -> Arc<str> {
    Arc::from(serde_json::json!({"joins": Value::Object(joins.0), "leaves": Value::Object(leaves.0)}).to_string())
}

impl Topics {
    pub fn new(sessions_topic: Option<Arc<str>>) -> Topics {
        Topics { sessions_topic, ..Topics::default() }
    }

    fn lists_sessions(&self, topic: &Topic) -> bool {
        !topic.private && self.sessions_topic.as_deref() == Some(&*topic.name)
    }

    /// `session` joins `topic` (again: its flags are replaced). With presence, it gets the
    /// topic's whole presence; `sessions` is the tenant's session list, asked for only when
    /// the topic shows it.
    pub fn join(&mut self, session: SessionId, topic: Topic, receive_own: bool, presence: bool, sessions: impl FnOnce() -> Vec<PresenceEntry>) -> Deliveries {
        let state = self.topics.entry(topic.clone()).or_default();
        state.members.insert(session, Member { receive_own, presence, stale: false });
        let joined = self.by_session.entry(session).or_default();
        if !joined.contains(&topic) {
            joined.push(topic.clone());
        }
        if !presence {
            return Vec::new();
        }
        let event = self.state_event(&topic, sessions);
        vec![(session, event)]
    }

    fn state_event(&self, topic: &Topic, sessions: impl FnOnce() -> Vec<PresenceEntry>) -> Arc<TopicEvent> {
        let mut state = PresenceMap::default();
        if self.lists_sessions(topic) {
            for entry in sessions() {
                state.session(&entry);
            }
        }
        if let Some(topic_state) = self.topics.get(topic) {
            for (key, tracked) in &topic_state.presences {
                for t in tracked {
                    state.add(key, t.meta_json(None));
                }
            }
        }
        let json: Arc<str> = Arc::from(Value::Object(state.0).to_string());
        Arc::new(TopicEvent { topic: topic.clone(), kind: TopicEventKind::PresenceState(json), skip: None })
    }

    /// `session` leaves `topic`; what it tracked there leaves the presence.
    pub fn leave(&mut self, session: SessionId, topic: &Topic) -> Deliveries {
        if let Some(joined) = self.by_session.get_mut(&session) {
            joined.retain(|t| t != topic);
            if joined.is_empty() {
                self.by_session.remove(&session);
            }
        }
        let Some(state) = self.topics.get_mut(topic) else { return Vec::new() };
        state.members.remove(&session);
        let leaves = Self::untrack_in(state, session);
        let deliveries = if leaves.is_empty() { Vec::new() } else { self.diff(topic, PresenceMap::default(), leaves) };
        if self.topics.get(topic).is_some_and(|s| s.members.is_empty() && s.presences.is_empty()) {
            self.topics.remove(topic);
        }
        deliveries
    }

    /// A session that went away leaves every topic it joined.
    pub fn remove_session(&mut self, session: SessionId) -> Deliveries {
        let topics = self.by_session.get(&session).cloned().unwrap_or_default();
        topics.iter().flat_map(|topic| self.leave(session, topic)).collect()
    }

    fn untrack_in(state: &mut TopicState, session: SessionId) -> PresenceMap {
        let mut leaves = PresenceMap::default();
        state.presences.retain(|key, tracked| {
            tracked.retain(|t| {
                let mine = t.session == session;
                if mine {
                    leaves.add(key, t.meta_json(None));
                }
                !mine
            });
            !tracked.is_empty()
        });
        leaves
    }

    /// `session` shows `meta` under `key` on `topic` (replacing what it showed there), or stops
    /// showing itself (`None`). Only a member may track.
    pub fn track(&mut self, session: SessionId, topic: &Topic, key: Arc<str>, meta: Option<Map<String, Value>>) -> Deliveries {
        if !self.is_member(session, topic) {
            return Vec::new();
        }
        self.show(session, topic, key, meta)
    }

    /// A session of another node shows itself on `topic` (or stops, with `None`), as it did
    /// there: the topic keeps it even while no session here joined it, for those that will.
    pub fn track_remote(&mut self, session: SessionId, topic: &Topic, key: Arc<str>, meta: Option<Map<String, Value>>) -> Deliveries {
        if meta.is_none() && !self.topics.contains_key(topic) {
            return Vec::new();
        }
        self.topics.entry(topic.clone()).or_default();
        let deliveries = self.show(session, topic, key, meta);
        self.drop_if_unused(topic);
        deliveries
    }

    /// Sessions of other nodes that went away: what they tracked leaves every topic.
    pub fn forget_remote(&mut self, sessions: &[SessionId]) -> Deliveries {
        if sessions.is_empty() {
            return Vec::new();
        }
        let topics: Vec<Topic> = self.topics.keys().cloned().collect();
        let mut deliveries = Vec::new();
        for topic in topics {
            let Some(state) = self.topics.get_mut(&topic) else { continue };
            let mut leaves = PresenceMap::default();
            for session in sessions {
                let gone = Self::untrack_in(state, *session);
                for (key, value) in gone.0 {
                    for meta in value.get("metas").and_then(Value::as_array).into_iter().flatten() {
                        leaves.add(&key, meta.clone());
                    }
                }
            }
            if !leaves.is_empty() {
                deliveries.extend(self.diff(&topic, PresenceMap::default(), leaves));
            }
            self.drop_if_unused(&topic);
        }
        deliveries
    }

    /// What the sessions for which `here` holds tracked, on which topic and under which key.
    pub fn tracked_by(&self, here: impl Fn(SessionId) -> bool) -> Vec<TrackedPresence> {
        let mut tracked = Vec::new();
        for (topic, state) in &self.topics {
            for (key, list) in &state.presences {
                for t in list.iter().filter(|t| here(t.session)) {
                    tracked.push(TrackedPresence { session: t.session, topic: topic.clone(), key: key.clone(), meta: t.meta.clone() });
                }
            }
        }
        tracked
    }

    fn drop_if_unused(&mut self, topic: &Topic) {
        if self.topics.get(topic).is_some_and(|s| s.members.is_empty() && s.presences.is_empty()) {
            self.topics.remove(topic);
        }
    }

    fn show(&mut self, session: SessionId, topic: &Topic, key: Arc<str>, meta: Option<Map<String, Value>>) -> Deliveries {
        self.next_ref += 1;
        let phx_ref = format!("F{:x}", self.next_ref);
        let Some(state) = self.topics.get_mut(topic) else { return Vec::new() };
        let mut previous: Option<(Arc<str>, Tracked)> = None;
        state.presences.retain(|k, tracked| {
            if let Some(i) = tracked.iter().position(|t| t.session == session) {
                previous = Some((k.clone(), tracked.remove(i)));
            }
            !tracked.is_empty()
        });
        let mut joins = PresenceMap::default();
        let mut leaves = PresenceMap::default();
        if let Some(meta) = meta {
            let tracked = Tracked { session, phx_ref, meta };
            // An update under the same key names the meta it replaces, as Phoenix does.
            let replaces = previous.as_ref().filter(|(k, _)| *k == key).map(|(_, t)| t.phx_ref.as_str());
            joins.add(&key, tracked.meta_json(replaces));
            state.presences.entry(key).or_default().push(tracked);
        }
        if let Some((old_key, old)) = previous {
            leaves.add(&old_key, old.meta_json(None));
        }
        if joins.is_empty() && leaves.is_empty() {
            return Vec::new();
        }
        self.diff(topic, joins, leaves)
    }

    /// The tenant's sessions came and went: the topic that lists them tells its members.
    pub fn sessions_changed(&mut self, joins: &[PresenceEntry], leaves: &[PresenceEntry]) -> Deliveries {
        let Some(name) = self.sessions_topic.clone() else { return Vec::new() };
        let topic = Topic { name, private: false };
        if !self.topics.contains_key(&topic) || (joins.is_empty() && leaves.is_empty()) {
            return Vec::new();
        }
        let (mut j, mut l) = (PresenceMap::default(), PresenceMap::default());
        joins.iter().for_each(|e| j.session(e));
        leaves.iter().for_each(|e| l.session(e));
        self.diff(&topic, j, l)
    }

    fn diff(&self, topic: &Topic, joins: PresenceMap, leaves: PresenceMap) -> Deliveries {
        let Some(state) = self.topics.get(topic) else { return Vec::new() };
        let event = Arc::new(TopicEvent { topic: topic.clone(), kind: TopicEventKind::PresenceDiff(diff_json(joins, leaves)), skip: None });
        // A member whose state is stale gets the whole state again instead (`refresh_stale`).
        state.members.iter().filter(|(_, m)| m.presence && !m.stale).map(|(id, _)| (*id, event.clone())).collect()
    }

    /// A broadcast on `topic` for its members (the sender only if it asked for its own).
    pub fn broadcast(&self, topic: &Topic, event: &str, payload: &Value, from: Option<SessionId>) -> Deliveries {
        let Some(state) = self.topics.get(topic) else { return Vec::new() };
        let skip = from.filter(|f| state.members.get(f).is_none_or(|m| !m.receive_own));
        let kind = TopicEventKind::Broadcast { event: Arc::from(event), payload: Arc::from(payload.to_string()) };
        let event = Arc::new(TopicEvent { topic: topic.clone(), kind, skip });
        state.members.keys().filter(|id| Some(**id) != skip).map(|id| (*id, event.clone())).collect()
    }

    /// Whether `session` joined `topic`.
    pub fn is_member(&self, session: SessionId, topic: &Topic) -> bool {
        self.topics.get(topic).is_some_and(|s| s.members.contains_key(&session))
    }

    /// A presence event could not be delivered to `session`: its topics' presence is stale.
    pub fn mark_stale(&mut self, session: SessionId, topic: &Topic) {
        if let Some(member) = self.topics.get_mut(topic).and_then(|s| s.members.get_mut(&session)) {
            member.stale = true;
        }
    }

    /// Whole states for members that missed a presence event; they are marked current again
    /// (the caller marks them stale anew when this delivery fails too).
    pub fn refresh_stale(&mut self, sessions: impl Fn() -> Vec<PresenceEntry>) -> Deliveries {
        let stale: Vec<(Topic, SessionId)> = self
            .topics
            .iter()
            .flat_map(|(topic, state)| state.members.iter().filter(|(_, m)| m.stale).map(move |(id, _)| (topic.clone(), *id)))
            .collect();
        let mut deliveries = Vec::new();
        for (topic, session) in stale {
            let event = self.state_event(&topic, &sessions);
            if let Some(member) = self.topics.get_mut(&topic).and_then(|s| s.members.get_mut(&session)) {
                member.stale = false;
            }
            deliveries.push((session, event));
        }
        deliveries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn topic(name: &str) -> Topic {
        Topic { name: Arc::from(name), private: false }
    }

    fn payload(event: &TopicEvent) -> Value {
        match &event.kind {
            TopicEventKind::PresenceState(json) | TopicEventKind::PresenceDiff(json) => serde_json::from_str(json).unwrap(),
            TopicEventKind::Broadcast { payload, .. } => serde_json::from_str(payload).unwrap(),
        }
    }

    fn meta(v: Value) -> Option<Map<String, Value>> {
        v.as_object().cloned()
    }

    #[test]
    fn another_nodes_presence_shows_until_its_session_goes() {
        let mut topics = Topics::new(None);
        let (here, there) = (SessionId::new_v4(), SessionId::new_v4());
        let room = topic("room1");
        // Tracked on another node before anyone here joined: kept for those who will.
        assert!(topics.track_remote(there, &room, Arc::from("bob"), meta(json!({"at": "till 2"}))).is_empty());
        let state = topics.join(here, room.clone(), false, true, Vec::new);
        assert_eq!(payload(&state[0].1)["bob"]["metas"][0]["at"], json!("till 2"));
        assert!(topics.tracked_by(|s| s == here).is_empty(), "a snapshot of this node leaves the other node's out");
        assert_eq!(topics.tracked_by(|s| s == there).len(), 1);
        let left = topics.forget_remote(&[there]);
        assert_eq!(left.len(), 1);
        assert_eq!(payload(&left[0].1)["leaves"]["bob"]["metas"][0]["at"], json!("till 2"));
        assert!(topics.track(there, &room, Arc::from("bob"), meta(json!({}))).is_empty(), "a remote session is no member here");
        // An untrack of a topic nobody here knows creates nothing.
        assert!(topics.track_remote(there, &topic("elsewhere"), Arc::from("bob"), None).is_empty());
        assert!(!topics.topics.contains_key(&topic("elsewhere")));
    }

    #[test]
    fn presence_state_then_diffs_with_refs() {
        let mut topics = Topics::new(None);
        let (a, b) = (SessionId::new_v4(), SessionId::new_v4());
        let room = topic("room1");
        assert!(topics.join(a, room.clone(), false, false, Vec::new).is_empty(), "no presence asked: no state");
        let state = topics.join(b, room.clone(), false, true, Vec::new);
        assert_eq!(payload(&state[0].1), json!({}));

        let tracked = topics.track(a, &room, Arc::from("u1"), meta(json!({"name": "Ann"})));
        assert_eq!(tracked.len(), 1, "only the member with presence is told");
        let diff = payload(&tracked[0].1);
        let first_ref = diff["joins"]["u1"]["metas"][0]["phx_ref"].as_str().unwrap().to_owned();
        assert_eq!(diff["joins"]["u1"]["metas"][0]["name"], "Ann");
        assert_eq!(diff["leaves"], json!({}));

        // An update under the same key names the meta it replaces.
        let updated = payload(&topics.track(a, &room, Arc::from("u1"), meta(json!({"name": "Ann B"})))[0].1);
        assert_eq!(updated["joins"]["u1"]["metas"][0]["phx_ref_prev"], first_ref.as_str());
        assert_eq!(updated["leaves"]["u1"]["metas"][0]["phx_ref"], first_ref.as_str());

        let late = SessionId::new_v4();
        let state = payload(&topics.join(late, room.clone(), false, true, Vec::new)[0].1);
        assert_eq!(state["u1"]["metas"].as_array().unwrap().len(), 1);
        assert_eq!(state["u1"]["metas"][0]["name"], "Ann B");

        // Leaving (or going away) takes the tracked meta with it.
        let left = topics.remove_session(a);
        assert_eq!(left.len(), 2, "both presence members are told");
        assert_eq!(payload(&left[0].1)["leaves"]["u1"]["metas"][0]["name"], "Ann B");
        let state = payload(&topics.join(late, room, false, true, Vec::new)[0].1);
        assert_eq!(state, json!({}));
    }

    #[test]
    fn broadcasts_skip_a_sender_that_did_not_ask_for_its_own() {
        let mut topics = Topics::new(None);
        let (quiet, echo, other) = (SessionId::new_v4(), SessionId::new_v4(), SessionId::new_v4());
        let room = topic("room1");
        topics.join(quiet, room.clone(), false, false, Vec::new);
        topics.join(echo, room.clone(), true, false, Vec::new);
        topics.join(other, room.clone(), false, false, Vec::new);
        let to = |from| {
            let mut ids: Vec<SessionId> = topics.broadcast(&room, "e", &json!({"x": 1}), Some(from)).into_iter().map(|(id, _)| id).collect();
            ids.sort();
            ids
        };
        let mut expected = vec![echo, other];
        expected.sort();
        assert_eq!(to(quiet), expected);
        let mut everyone = vec![quiet, echo, other];
        everyone.sort();
        assert_eq!(to(echo), everyone);
        let private = Topic { name: Arc::from("room1"), private: true };
        assert!(topics.broadcast(&private, "e", &json!({}), None).is_empty(), "a private topic of the same name is another topic");
    }

    #[test]
    fn the_sessions_topic_lists_hub_sessions() {
        let mut topics = Topics::new(Some(Arc::from("sessions")));
        let watcher = SessionId::new_v4();
        let entry = PresenceEntry {
            session_id: SessionId::new_v4(),
            device_id: "pos-1".into(),
            user_id: "u1".into(),
            role: "staff".into(),
            mode: protocol::SessionMode::Device,
            since_ms: 7,
        };
        let listed = entry.clone();
        let state = payload(&topics.join(watcher, topic("sessions"), false, true, move || vec![listed])[0].1);
        assert_eq!(state[entry.session_id.to_string()]["metas"][0]["device_id"], "pos-1");
        let left = topics.sessions_changed(&[], std::slice::from_ref(&entry));
        assert_eq!(payload(&left[0].1)["leaves"][entry.session_id.to_string()]["metas"][0]["user_id"], "u1");
        assert!(topics.join(watcher, topic("other"), false, true, || panic!("only the sessions topic lists sessions")).len() == 1);
    }
}
