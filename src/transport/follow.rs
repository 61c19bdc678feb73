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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The tenant actor has not answered the subscription yet: live frames are held.
    Starting,
    /// Reading entries older than the live stream.
    CatchingUp,
    Live,
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

pub struct Follower {
    phase: Phase,
    /// Last seq of the stream the session has handled.
    position: Seq,
    reading: bool,
    held: VecDeque<Arc<SharedFrame>>,
    max_held: usize,
    /// Highest seq of a live frame dropped because too many were held.
    dropped_upto: Seq,
    /// Read again from this seq once the read under way is done.
    rewind_to: Option<Seq>,
}

impl Follower {
    /// A follower that holds up to `max_held` live frames while it reads.
    pub fn new(max_held: usize) -> Follower {
        Follower { phase: Phase::Starting, position: 0, reading: false, held: VecDeque::new(), max_held: max_held.max(1), dropped_upto: 0, rewind_to: None }
    }

    pub fn position(&self) -> Seq {
        self.position
    }

    pub fn is_live(&self) -> bool {
        self.phase == Phase::Live
    }

    /// The subscription was answered with the tenant's `head`: the stream starts after it.
    /// Returns whether a read must start (frames held meanwhile left a gap).
    pub fn started(&mut self, head: Seq) -> bool {
        self.position = head;
        self.phase = Phase::CatchingUp;
        // Nothing older to read: going live delivers the held frames, or finds their gap.
        self.reading = false;
        true
    }

    fn hold(&mut self, frame: Arc<SharedFrame>) {
        if self.held.len() >= self.max_held {
            // Bounded: forget what is held; the log has it.
            self.held.clear();
            self.dropped_upto = self.dropped_upto.max(frame.seq);
        } else {
            self.held.push_back(frame);
        }
    }

    /// A live frame arrived.
    pub fn live_frame(&mut self, frame: Arc<SharedFrame>) -> LiveVerdict {
        match self.phase {
            Phase::Starting | Phase::CatchingUp => {
                self.hold(frame);
                LiveVerdict::Nothing
            }
            Phase::Live if frame.seq <= self.position => LiveVerdict::Nothing,
            Phase::Live if frame.after > self.position => {
                // Frames went missing (a full mailbox): the log has them.
                self.phase = Phase::CatchingUp;
                self.hold(frame);
                LiveVerdict::Read
            }
            Phase::Live => {
                let after = self.position;
                self.position = frame.seq;
                LiveVerdict::Deliver { after }
            }
        }
    }

    /// The session missed frames it was sent (its mailbox was full): read from the position.
    pub fn lagged(&mut self) -> bool {
        if self.phase == Phase::Live {
            self.phase = Phase::CatchingUp;
            return true;
        }
        false
    }

    /// Something of the session needs the stream again from `to` (a new subscription starts
    /// there). Returns whether a read must start.
    pub fn rewind(&mut self, to: Seq) -> bool {
        if to >= self.position && self.rewind_to.is_none_or(|r| to >= r) {
            return false;
        }
        match self.phase {
            Phase::Starting => {
                // Applied when the subscription is answered and the first read starts.
                self.rewind_to = Some(self.rewind_to.map_or(to, |r| r.min(to)));
                false
            }
            Phase::Live => {
                self.held.clear();
                self.phase = Phase::CatchingUp;
                self.position = to;
                true
            }
            Phase::CatchingUp => {
                self.rewind_to = Some(self.rewind_to.map_or(to, |r| r.min(to)));
                !self.reading
            }
        }
    }

    /// Start the next read: the seq to read after, or `None` when a read is under way or the
    /// session is live.
    pub fn next_read(&mut self) -> Option<Seq> {
        if self.reading || self.phase != Phase::CatchingUp {
            return None;
        }
        if let Some(to) = self.rewind_to.take() {
            self.position = self.position.min(to);
        }
        self.reading = true;
        Some(self.position)
    }

    /// A read after `after` failed: it is tried again at the next `next_read`.
    pub fn read_failed(&mut self) {
        self.reading = false;
    }

    /// A page was read and its deltas up to `last` handed out (`None`: the page was empty);
    /// `exhausted` when it was the stream's end as of the read.
    pub fn page_read(&mut self, last: Option<Seq>, exhausted: bool) -> AfterPage {
        self.reading = false;
        if let Some(last) = last {
            self.position = self.position.max(last);
        }
        if !exhausted || self.dropped_upto > self.position || self.rewind_to.is_some() {
            return AfterPage::ReadAgain;
        }
        while self.held.front().is_some_and(|f| f.seq <= self.position) {
            self.held.pop_front();
        }
        if self.held.front().is_some_and(|f| f.after > self.position) {
            return AfterPage::ReadAgain; // a gap the log has not shown yet
        }
        self.phase = Phase::Live;
        self.dropped_upto = 0;
        AfterPage::Live(std::mem::take(&mut self.held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Op;

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
            })
            .collect();
        SharedFrame::split_by_origin(after, deltas).pop().unwrap()
    }

    #[test]
    fn frames_before_the_answer_are_held_and_go_out_in_order() {
        let mut f = Follower::new(8);
        assert_eq!(f.live_frame(frame(10, 12)), LiveVerdict::Nothing);
        assert!(f.started(10));
        assert_eq!(f.next_read(), Some(10));
        let AfterPage::Live(held) = f.page_read(None, true) else { panic!("live") };
        assert_eq!(held.len(), 1);
        for h in held {
            assert_eq!(f.live_frame(h), LiveVerdict::Deliver { after: 10 });
        }
        assert_eq!(f.position(), 12);
        assert_eq!(f.live_frame(frame(11, 12)), LiveVerdict::Nothing, "already delivered");
    }

    #[test]
    fn a_gap_reads_the_log_before_anything_past_it() {
        let mut f = Follower::new(8);
        f.started(5);
        f.next_read();
        f.page_read(None, true);
        assert_eq!(f.live_frame(frame(7, 9)), LiveVerdict::Read, "6 and 7 are missing");
        assert_eq!(f.live_frame(frame(9, 10)), LiveVerdict::Nothing, "held");
        assert_eq!(f.next_read(), Some(5));
        assert!(matches!(f.page_read(Some(6), true), AfterPage::ReadAgain), "7 is still missing");
        assert_eq!(f.next_read(), Some(6));
        let AfterPage::Live(held) = f.page_read(Some(7), true) else { panic!("live") };
        let afters: Vec<_> = held.into_iter().map(|h| f.live_frame(h)).collect();
        assert_eq!(afters, vec![LiveVerdict::Deliver { after: 7 }, LiveVerdict::Deliver { after: 9 }]);
    }

    #[test]
    fn a_rewind_rereads_and_holds_live_frames_meanwhile() {
        let mut f = Follower::new(8);
        f.started(20);
        f.next_read();
        f.page_read(None, true);
        assert!(f.rewind(15));
        assert_eq!(f.live_frame(frame(20, 21)), LiveVerdict::Nothing);
        assert!(!f.rewind(17), "a later rewind while reading is folded in");
        assert_eq!(f.next_read(), Some(15));
        assert!(matches!(f.page_read(Some(20), true), AfterPage::Live(_)));
    }

    #[test]
    fn too_many_held_frames_are_read_again_from_the_log() {
        let mut f = Follower::new(2);
        f.started(0);
        assert_eq!(f.next_read(), Some(0));
        for n in 0..5 {
            f.live_frame(frame(n, n + 1));
        }
        assert!(matches!(f.page_read(None, true), AfterPage::ReadAgain), "dropped frames: read them");
        assert_eq!(f.next_read(), Some(0));
        let AfterPage::Live(held) = f.page_read(Some(5), true) else { panic!("live") };
        assert!(held.iter().all(|h| h.seq <= 5) || held.is_empty());
    }
}
