//! Following the tenant's stream, whatever the session's protocol: where the session stands
//! (its position), reads of the entries after a position (the tenant actor's memory first,
//! then the log, through the storage API), and the live frames it holds while it reads older
//! entries, so that it goes live with no gap and no duplicate. The [`Follower`] state is pure;
//! the session acts on what it answers.

use std::collections::VecDeque;
use std::sync::Arc;

use actix::Addr;
use protocol::Delta;

use crate::actors::messages::{RecentLog, SharedFrame};
use crate::actors::tenant::TenantActor;
use crate::error::Result;
use crate::ids::{Seq, TenantId};
use crate::storage::Store;

/// Where a page of the stream was read: the tenant actor's memory (shared frames) or Postgres.
pub enum StreamRead {
    Memory(Vec<Arc<SharedFrame>>),
    Log(Vec<Delta>),
}

impl StreamRead {
    /// The page's deltas: at most `limit` entries after `after`, in seq order.
    pub fn page(&self, after: Seq, limit: u32) -> Vec<&Delta> {
        match self {
            StreamRead::Memory(frames) => {
                frames.iter().flat_map(|f| f.deltas.iter()).filter(|d| d.seq > after).take(limit as usize).collect()
            }
            StreamRead::Log(deltas) => deltas.iter().take(limit as usize).collect(),
        }
    }
}

/// Up to `limit` entries of the tenant's stream after `after`, and the head they were read at:
/// from the tenant actor's memory when it reaches back that far, else from the log.
pub async fn read_after(store: &Store, tenant: &TenantId, actor: Option<Addr<TenantActor>>, after: Seq, limit: u32) -> Result<(StreamRead, Seq)> {
    if let Some(actor) = actor {
        if let Ok(Some((frames, head))) = actor.send(RecentLog { after, limit }).await {
            return Ok((StreamRead::Memory(frames), head));
        }
    }
    let read = store.read_log(tenant, after, None, limit).await?;
    Ok((StreamRead::Log(read.deltas), read.head_seq))
}

/// What to do with a live frame.
#[derive(Debug, PartialEq, Eq)]
pub enum LiveVerdict {
    /// Deliver the frame's deltas after `after` (the position moved to the frame's seq).
    Deliver { after: Seq },
    /// Already delivered, or held until the session catches up.
    Nothing,
    /// Frames went missing: read the stream (`next_read`).
    Read,
}

/// What follows a page that was read.
pub enum AfterPage {
    /// Read the next page.
    ReadAgain,
    /// Live now: these held frames go out first (through [`Follower::live_frame`]).
    Live(VecDeque<Arc<SharedFrame>>),
}

/// A session's place in its tenant's stream. Live, it is only a position: what a session
/// needs while it is not live (starting, or reading older entries) is boxed, so an idle live
/// session stays small.
pub struct Follower {
    /// Last seq of the stream the session has handled.
    position: Seq,
    /// Present while not live.
    behind: Option<Box<Behind>>,
}

#[derive(Default)]
struct Behind {
    /// Not started yet (the subscription is not answered): frames are held, nothing is read.
    starting: bool,
    /// A read is under way.
    reading: bool,
    /// Live frames held while reading, oldest first.
    frames: VecDeque<Arc<SharedFrame>>,
    /// Highest seq of a live frame dropped because too many were held.
    dropped_upto: Seq,
    /// Read again from this seq once the read under way is done.
    rewind_to: Option<Seq>,
}

impl Default for Follower {
    fn default() -> Follower {
        Follower::new()
    }
}

impl Follower {
    /// A follower that has not started: it holds live frames until `start_at`.
    pub fn new() -> Follower {
        Follower { position: 0, behind: Some(Box::new(Behind { starting: true, ..Behind::default() })) }
    }

    pub fn position(&self) -> Seq {
        self.position
    }

    pub fn is_live(&self) -> bool {
        self.behind.is_none()
    }

    fn behind(&mut self) -> &mut Behind {
        self.behind.get_or_insert_with(Box::default)
    }

    /// Read the stream from `position` (held frames are kept: what they add past it is not
    /// read twice).
    pub fn start_at(&mut self, position: Seq) {
        self.position = position;
        let behind = self.behind();
        behind.starting = false;
        behind.reading = false;
    }

    /// Stop following (the session was told to resync): frames are held again until `start_at`,
    /// from nothing.
    pub fn stop(&mut self) {
        self.behind = Some(Box::new(Behind { starting: true, ..Behind::default() }));
    }

    /// A live frame arrived; `max_held` bounds what is held while not live.
    pub fn live_frame(&mut self, frame: Arc<SharedFrame>, max_held: usize) -> LiveVerdict {
        let verdict = match &self.behind {
            Some(_) => LiveVerdict::Nothing,
            None if frame.seq <= self.position => return LiveVerdict::Nothing,
            // Frames went missing (a full mailbox): the log has them.
            None if frame.after > self.position => LiveVerdict::Read,
            None => {
                let after = self.position;
                self.position = frame.seq;
                return LiveVerdict::Deliver { after };
            }
        };
        let behind = self.behind();
        if behind.frames.len() >= max_held.max(1) {
            // Bounded: forget what is held; the log has it.
            behind.frames.clear();
            behind.dropped_upto = behind.dropped_upto.max(frame.seq);
        } else {
            behind.frames.push_back(frame);
        }
        verdict
    }

    /// The session missed frames it was sent (its mailbox was full): read from the position.
    pub fn lagged(&mut self) -> bool {
        if self.behind.is_none() {
            self.behind();
            return true;
        }
        false
    }

    /// Something of the session needs the stream again from `to` (a new subscription starts
    /// there). Returns whether a read must start.
    pub fn rewind(&mut self, to: Seq) -> bool {
        let pending = self.behind.as_ref().and_then(|b| b.rewind_to);
        if to >= self.position && pending.is_none_or(|r| to >= r) {
            return false;
        }
        match self.behind.as_mut() {
            None => {
                self.position = to;
                self.behind();
                true
            }
            Some(behind) => {
                behind.rewind_to = Some(behind.rewind_to.map_or(to, |r| r.min(to)));
                !behind.starting && !behind.reading
            }
        }
    }

    /// Whether a read should start now (`next_read` would give one).
    pub fn wants_read(&self) -> bool {
        self.behind.as_ref().is_some_and(|b| !b.starting && !b.reading)
    }

    /// Start the next read: the seq to read after, or `None` when a read is under way, the
    /// follower has not started, or it is live.
    pub fn next_read(&mut self) -> Option<Seq> {
        if !self.wants_read() {
            return None;
        }
        let behind = self.behind();
        let rewind_to = behind.rewind_to.take();
        behind.reading = true;
        if let Some(to) = rewind_to {
            self.position = self.position.min(to);
        }
        Some(self.position)
    }

    /// A read failed: it is tried again at the next `next_read`.
    pub fn read_failed(&mut self) {
        if let Some(behind) = self.behind.as_mut() {
            behind.reading = false;
        }
    }

    /// A page was read and its deltas up to `last` handed out (`None`: the page was empty);
    /// `exhausted` when it was the stream's end as of the read (and the session may go live).
    pub fn page_read(&mut self, last: Option<Seq>, exhausted: bool) -> AfterPage {
        if let Some(last) = last {
            self.position = self.position.max(last);
        }
        let position = self.position;
        let behind = self.behind();
        behind.reading = false;
        if !exhausted || behind.dropped_upto > position || behind.rewind_to.is_some() {
            return AfterPage::ReadAgain;
        }
        while behind.frames.front().is_some_and(|f| f.seq <= position) {
            behind.frames.pop_front();
        }
        if behind.frames.front().is_some_and(|f| f.after > position) {
            return AfterPage::ReadAgain; // a gap the log has not shown yet
        }
        // Live now: what was held goes out, and the box goes.
        AfterPage::Live(self.behind.take().map(|b| b.frames).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Op;

    const MAX: usize = 8;

    fn frame(after: Seq, seq: Seq) -> Arc<SharedFrame> {
        let deltas = (after + 1..=seq)
            .map(|s| Delta {
                seq: s,
                table: "t".into(),
                op: Op::Delete,
                key: Default::default(),
                row: None,
                old: None,
                origin: None,
                change_id: None,
                left: false,
            })
            .collect();
        SharedFrame::split_by_origin(after, deltas).pop().unwrap()
    }

    #[test]
    fn frames_before_the_answer_are_held_and_go_out_in_order() {
        let mut f = Follower::new();
        assert_eq!(f.live_frame(frame(10, 12), MAX), LiveVerdict::Nothing);
        f.start_at(10);
        assert_eq!(f.next_read(), Some(10));
        let AfterPage::Live(held) = f.page_read(None, true) else { panic!("live") };
        assert_eq!(held.len(), 1);
        for h in held {
            assert_eq!(f.live_frame(h, MAX), LiveVerdict::Deliver { after: 10 });
        }
        assert_eq!(f.position(), 12);
        assert_eq!(f.live_frame(frame(11, 12), MAX), LiveVerdict::Nothing, "already delivered");
    }

    #[test]
    fn a_gap_reads_the_log_before_anything_past_it() {
        let mut f = Follower::new();
        f.start_at(5);
        f.next_read();
        f.page_read(None, true);
        assert_eq!(f.live_frame(frame(7, 9), MAX), LiveVerdict::Read, "6 and 7 are missing");
        assert_eq!(f.live_frame(frame(9, 10), MAX), LiveVerdict::Nothing, "held");
        assert_eq!(f.next_read(), Some(5));
        assert!(matches!(f.page_read(Some(6), true), AfterPage::ReadAgain), "7 is still missing");
        assert_eq!(f.next_read(), Some(6));
        let AfterPage::Live(held) = f.page_read(Some(7), true) else { panic!("live") };
        let afters: Vec<_> = held.into_iter().map(|h| f.live_frame(h, MAX)).collect();
        assert_eq!(afters, vec![LiveVerdict::Deliver { after: 7 }, LiveVerdict::Deliver { after: 9 }]);
    }

    #[test]
    fn a_rewind_rereads_and_holds_live_frames_meanwhile() {
        let mut f = Follower::new();
        f.start_at(20);
        f.next_read();
        f.page_read(None, true);
        assert!(f.rewind(15));
        assert_eq!(f.live_frame(frame(20, 21), MAX), LiveVerdict::Nothing);
        assert!(!f.rewind(17), "a later rewind while reading is folded in");
        assert_eq!(f.next_read(), Some(15));
        assert!(matches!(f.page_read(Some(20), true), AfterPage::Live(_)));
    }

    #[test]
    fn too_many_held_frames_are_read_again_from_the_log() {
        let mut f = Follower::new();
        f.start_at(0);
        assert_eq!(f.next_read(), Some(0));
        for n in 0..5 {
            f.live_frame(frame(n, n + 1), 2);
        }
        assert!(matches!(f.page_read(None, true), AfterPage::ReadAgain), "dropped frames: read them");
        assert_eq!(f.next_read(), Some(0));
        let AfterPage::Live(held) = f.page_read(Some(5), true) else { panic!("live") };
        assert!(held.iter().all(|h| h.seq <= 5) || held.is_empty());
    }

    /// A session's view of the hub: frames are fanned out (some lost to a full mailbox, with
    /// a `lagged` notice later), reads of the log come back later, in pages; whatever the
    /// interleaving, every seq is handed out once and in order.
    #[derive(Debug, Clone)]
    enum Step {
        Fan { lost: bool },
        Lagged,
        StartRead,
        FinishRead,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => any::<bool>().prop_map(|lost| Step::Fan { lost }),
            1 => Just(Step::Lagged),
            2 => Just(Step::StartRead),
            2 => Just(Step::FinishRead),
        ]
    }

    proptest::proptest! {
        #[test]
        fn every_seq_is_handed_out_once_in_order(steps in proptest::collection::vec(step(), 1..200), page in 1u64..6, max_held in 1usize..5, sizes in proptest::collection::vec(1u64..4, 200)) {
            let mut f = Follower::new();
            f.start_at(0);
            let mut handed: Vec<Seq> = Vec::new();
            let mut head: Seq = 0;
            let mut frames_made = 0usize;
            let mut in_flight: Option<Seq> = None;
            let mut lagged = false;
            let deliver = |f: &mut Follower, handed: &mut Vec<Seq>, frame: Arc<SharedFrame>| {
                match f.live_frame(frame.clone(), max_held) {
                    LiveVerdict::Deliver { after } => handed.extend(frame.deltas.iter().map(|d| d.seq).filter(|s| *s > after)),
                    LiveVerdict::Nothing | LiveVerdict::Read => {}
                }
            };
            let finish = |f: &mut Follower, handed: &mut Vec<Seq>, after: Seq, head: Seq| {
                let last = (after + page).min(head);
                handed.extend(after + 1..=last);
                let exhausted = last - after < page;
                if let AfterPage::Live(held) = f.page_read((last > after).then_some(last), exhausted) {
                    for frame in held {
                        if let LiveVerdict::Deliver { after } = f.live_frame(frame.clone(), max_held) {
                            handed.extend(frame.deltas.iter().map(|d| d.seq).filter(|s| *s > after));
                        }
                    }
                }
            };
            for s in steps {
                match s {
                    Step::Fan { lost } => {
                        let size = sizes[frames_made % sizes.len()];
                        frames_made += 1;
                        let frame = frame(head, head + size);
                        head += size;
                        if lost {
                            lagged = true;
                        } else {
                            deliver(&mut f, &mut handed, frame);
                        }
                    }
                    Step::Lagged if lagged => {
                        lagged = false;
                        f.lagged();
                    }
                    Step::Lagged => {}
                    Step::StartRead => {
                        if in_flight.is_none() {
                            in_flight = f.next_read();
                        }
                    }
                    Step::FinishRead => {
                        if let Some(after) = in_flight.take() {
                            finish(&mut f, &mut handed, after, head);
                        }
                    }
                }
            }
            // Quiet now: the lost frames' notice arrives, and reads run until live.
            if lagged {
                f.lagged();
            }
            for _ in 0..10_000 {
                if let Some(after) = in_flight.take().or_else(|| f.next_read()) {
                    finish(&mut f, &mut handed, after, head);
                } else {
                    break;
                }
            }
            proptest::prop_assert!(f.is_live(), "ends live");
            let expected: Vec<Seq> = (1..=head).collect();
            proptest::prop_assert_eq!(handed, expected);
        }
    }
}
