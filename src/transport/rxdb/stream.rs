//! What an RxDB socket may stream to one collection. The client merges every checkpoint it
//! is given into the one it saves, so a stream event must never carry a checkpoint past a
//! change the client has not been given: the socket keeps, per collection, the seq up to which
//! the client has been given everything (by a pull reply or earlier events), extends it frame
//! by frame while the tenant's live frames follow on from it, and answers anything else (a gap,
//! a frame it could not send, a pull still being read) with `RESYNC`, after which the client
//! pulls from its own checkpoint. Pure state, no I/O.

use crate::ids::Seq;

/// The coverage of one collection on one socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Every change of the collection up to this seq has been given to the client; `None`
    /// when the socket does not know (before the first pull, after a gap).
    covered: Option<Seq>,
}

/// What to do with a live frame covering seqs `(after, seq]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameVerdict {
    /// Nothing to send: already covered, or not known (a pull will cover it).
    Skip,
    /// Send the collection's changes with seqs in `(from, to]`, with checkpoint `to`.
    Send { from: Seq, to: Seq },
    /// The frame does not follow on from what the client has: tell it to pull again.
    Resync,
}

impl Coverage {
    pub fn covered(&self) -> Option<Seq> {
        self.covered
    }

    /// A pull reply gave the client everything up to `checkpoint` (`None`: a snapshot page,
    /// which covers no seq until the snapshot is done).
    pub fn pulled(&mut self, checkpoint: Option<Seq>) {
        self.covered = checkpoint;
    }

    /// A live frame `(after, seq]` of the tenant's stream.
    pub fn frame(&mut self, after: Seq, seq: Seq) -> FrameVerdict {
        match self.covered {
            None => FrameVerdict::Skip,
            Some(covered) if covered >= seq => FrameVerdict::Skip,
            Some(covered) if covered < after => {
                self.covered = None;
                FrameVerdict::Resync
            }
            Some(covered) => {
                self.covered = Some(seq);
                FrameVerdict::Send { from: covered, to: seq }
            }
        }
    }

    /// A frame the socket could not send or did not receive: forget what is covered. Returns
    /// whether the client must be told (`RESYNC`), which it need not when nothing was known.
    pub fn lose(&mut self) -> bool {
        self.covered.take().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_that_follow_on_extend_the_coverage() {
        let mut c = Coverage::default();
        assert_eq!(c.frame(0, 3), FrameVerdict::Skip);
        c.pulled(Some(5));
        assert_eq!(c.frame(3, 5), FrameVerdict::Skip);
        assert_eq!(c.frame(4, 8), FrameVerdict::Send { from: 5, to: 8 });
        assert_eq!(c.frame(8, 9), FrameVerdict::Send { from: 8, to: 9 });
        assert_eq!(c.frame(12, 13), FrameVerdict::Resync);
        assert_eq!(c.covered(), None);
        assert_eq!(c.frame(13, 14), FrameVerdict::Skip);
        c.pulled(Some(14));
        assert!(c.lose());
        assert!(!c.lose());
    }

    /// A client as RxDB keeps it: the changes it was given and the checkpoint it saved.
    #[derive(Default)]
    struct Client {
        given: std::collections::BTreeSet<Seq>,
        checkpoint: Seq,
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// The next live frame holds this many changes; `lost`: it never reached the socket.
        Frame { len: u64, lost: bool },
        /// The client pulls from its checkpoint (to the head).
        Pull,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (1u64..5, proptest::bool::weighted(0.15)).prop_map(|(len, lost)| Step::Frame { len, lost }),
            1 => Just(Step::Pull),
        ]
    }

    proptest! {
        /// Whatever frames are lost and whenever the client pulls, every checkpoint the client
        /// saves is one below which it was given every change, and what the socket counts as
        /// covered was given too.
        #[test]
        fn no_checkpoint_passes_a_change_the_client_was_not_given(steps in proptest::collection::vec(step(), 1..60)) {
            let mut coverage = Coverage::default();
            let mut client = Client::default();
            let mut head: Seq = 0;
            for step in steps {
                match step {
                    Step::Frame { len, lost } => {
                        let after = head;
                        head += len;
                        if lost {
                            continue;
                        }
                        match coverage.frame(after, head) {
                            FrameVerdict::Skip | FrameVerdict::Resync => {}
                            FrameVerdict::Send { from, to } => {
                                client.given.extend(from + 1..=to);
                                client.checkpoint = client.checkpoint.max(to);
                            }
                        }
                    }
                    Step::Pull => {
                        client.given.extend(client.checkpoint + 1..=head);
                        client.checkpoint = head;
                        coverage.pulled(Some(head));
                    }
                }
                prop_assert!((1..=client.checkpoint).all(|s| client.given.contains(&s)), "checkpoint {} passes a change not given", client.checkpoint);
                if let Some(covered) = coverage.covered() {
                    prop_assert!((1..=covered).all(|s| client.given.contains(&s)));
                }
            }
        }
    }
}
