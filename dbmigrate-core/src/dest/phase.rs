//! Where the destination stands in a migration, as the RAM owner sees it,
//! and the one pure function that moves it on ([`step`]).
//!
//! ```text
//!  Rounds ──PrepareSwitch + every PrepareMark──> Prepared   (holes punched)
//!    │                                              │
//!    └──────────── Switch + every SwitchMark ───────┴──> PostCopy
//! ```
//!
//! A round ends when every data connection delivered its `Drain` and no
//! storage read is outstanding ([`Phase::round_drained`]). The preparation
//! of the switch is optional (it moves work out of the pause). The control
//! connection's half of a step (`PrepareSwitch`, `Switch`) and the data
//! connections' markers arrive on different channels in either order; a
//! transition happens once all of them are in. Anything else is out of
//! place in its phase and ends the session with [`PhaseError`].
//!
//! Pages, storage results and faults are legal in every phase: what they
//! do depends on the phase (see `applier.rs`), but they never change it.

use thiserror::Error;

use super::faults::Post;
use crate::bitmap::PageBitmap;

/// A message that moves the phase on (pages, storage results and faults
/// do not).
#[derive(Debug)]
pub(super) enum Event {
    /// A data connection finished round `round`.
    Drain {
        /// The round.
        round: u32,
    },
    /// A data connection delivered everything before the switch's preparation.
    PrepareMark,
    /// The source will switch to post-copy; these pages are stale here.
    PrepareSwitch(PageBitmap),
    /// A data connection reached the switch to post-copy.
    SwitchMark,
    /// The source switched: pages whose content is still to come.
    Switch(PageBitmap),
    /// A data connection ended its stream.
    End,
}

impl Event {
    /// The message's name, for errors and logs.
    pub(super) fn name(&self) -> &'static str {
        match self {
            Event::Drain { .. } => "Drain",
            Event::PrepareMark => "PrepareMark",
            Event::PrepareSwitch(_) => "PrepareSwitch",
            Event::SwitchMark => "SwitchMark",
            Event::Switch(_) => "Switch",
            Event::End => "EndOfStream",
        }
    }
}

/// The destination's phase.
#[derive(Debug)]
pub(super) enum Phase {
    /// Pre-copy rounds: `drains` data connections finished round `round`.
    Rounds {
        /// Connections whose Drain for the current round came.
        drains: usize,
        /// The round being drained.
        round: u32,
    },
    /// The preparation of the switch: the control connection's stale
    /// pages (once they came) and the data connections' marks so far.
    Preparing {
        /// Pages the source will send again.
        stale: Option<PageBitmap>,
        /// PrepareMarks received.
        marks: usize,
    },
    /// Prepared; the source pauses its VM. `holes`: pages punched out of
    /// the RAM at the preparation and neither written nor faulted in since
    /// (none on a destination that cannot serve post-copy).
    Prepared {
        /// See above.
        holes: Option<PageBitmap>,
    },
    /// The switch: the control connection's pending pages (once they
    /// came) and the data connections' marks so far.
    Switching {
        /// Pages still to come from the source.
        pending: Option<PageBitmap>,
        /// SwitchMarks received.
        marks: usize,
        /// Carried over from [`Phase::Prepared`].
        holes: Option<PageBitmap>,
    },
    /// Post-copy: the source's RAM is frozen, the VM's faults are served.
    PostCopy(Post),
}

impl Default for Phase {
    fn default() -> Self {
        Phase::Rounds {
            drains: 0,
            round: 0,
        }
    }
}

/// What the RAM owner must do after a [`step`].
#[derive(Debug)]
pub(super) enum Transition {
    /// Nothing but keep the new phase.
    Stay(Phase),
    /// Prepare the switch (punch `stale`), then be [`Phase::Prepared`].
    Prepare {
        /// Pages the source will send again.
        stale: PageBitmap,
    },
    /// Switch to post-copy with `pending` missing, then be [`Phase::PostCopy`].
    Switch {
        /// Pages still to come.
        pending: PageBitmap,
        /// Holes the preparation punched (not punched again).
        holes: Option<PageBitmap>,
    },
}

/// A message out of place in the destination's phase.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("the source sent {got} while the destination was {phase}: a source that does not follow the protocol")]
pub struct PhaseError {
    /// What came.
    pub got: &'static str,
    /// The phase it came in.
    pub phase: &'static str,
}

impl Phase {
    /// The phase's name, for errors and logs.
    pub(super) fn name(&self) -> &'static str {
        match self {
            Phase::Rounds { .. } => "receiving rounds",
            Phase::Preparing { .. } => "preparing the switch to post-copy",
            Phase::Prepared { .. } => "prepared for the switch",
            Phase::Switching { .. } => "switching to post-copy",
            Phase::PostCopy(_) => "in post-copy",
        }
    }

    /// The post-copy state, once switched.
    pub(super) fn post(&self) -> Option<&Post> {
        match self {
            Phase::PostCopy(p) => Some(p),
            _ => None,
        }
    }

    /// See [`Phase::post`].
    pub(super) fn post_mut(&mut self) -> Option<&mut Post> {
        match self {
            Phase::PostCopy(p) => Some(p),
            _ => None,
        }
    }

    /// Holes punched by the preparation that the switch need not punch again.
    pub(super) fn holes_mut(&mut self) -> Option<&mut PageBitmap> {
        match self {
            Phase::Prepared { holes } | Phase::Switching { holes, .. } => holes.as_mut(),
            _ => None,
        }
    }

    /// Whether the preparation punched its holes already.
    #[cfg(test)]
    fn is_prepared(&self) -> bool {
        matches!(
            self,
            Phase::Prepared { holes: Some(_) } | Phase::Switching { holes: Some(_), .. }
        )
    }

    /// The round that just ended, if every one of `conns` connections
    /// drained it and no storage read is outstanding: the Drained answer
    /// is due, and the count starts again.
    pub(super) fn round_drained(&mut self, conns: usize, outstanding: u64) -> Option<u32> {
        match self {
            Phase::Rounds { drains, round } if *drains == conns && outstanding == 0 => {
                *drains = 0;
                Some(*round)
            }
            _ => None,
        }
    }
}

/// Moves `phase` on by `event`, with `conns` data connections; `ended`
/// connections have ended their streams (counting this one, for
/// [`Event::End`]).
pub(super) fn step(
    phase: Phase,
    event: Event,
    conns: usize,
    ended: usize,
) -> Result<Transition, PhaseError> {
    let out_of_place = |phase: &Phase, event: &Event| PhaseError {
        got: event.name(),
        phase: phase.name(),
    };
    let next = match (phase, event) {
        (Phase::Rounds { drains, .. }, Event::Drain { round }) if drains < conns => Phase::Rounds {
            drains: drains + 1,
            round,
        },
        // A stream ends after its last round, or in post-copy.
        (p @ (Phase::Rounds { drains: 0, .. } | Phase::PostCopy(_)), Event::End)
            if ended <= conns =>
        {
            p
        }
        (Phase::Rounds { drains: 0, .. }, Event::PrepareMark) => Phase::Preparing {
            stale: None,
            marks: 1,
        },
        (Phase::Rounds { drains: 0, .. }, Event::PrepareSwitch(stale)) => Phase::Preparing {
            stale: Some(stale),
            marks: 0,
        },
        (Phase::Preparing { stale, marks }, Event::PrepareMark) if marks < conns => {
            Phase::Preparing {
                stale,
                marks: marks + 1,
            }
        }
        (Phase::Preparing { stale: None, marks }, Event::PrepareSwitch(stale)) => {
            Phase::Preparing {
                stale: Some(stale),
                marks,
            }
        }
        // The preparation is optional: a source may switch from its rounds.
        (Phase::Rounds { drains: 0, .. }, Event::SwitchMark) => Phase::Switching {
            pending: None,
            marks: 1,
            holes: None,
        },
        (Phase::Rounds { drains: 0, .. }, Event::Switch(pending)) => Phase::Switching {
            pending: Some(pending),
            marks: 0,
            holes: None,
        },
        (Phase::Prepared { holes }, Event::SwitchMark) => Phase::Switching {
            pending: None,
            marks: 1,
            holes,
        },
        (Phase::Prepared { holes }, Event::Switch(pending)) => Phase::Switching {
            pending: Some(pending),
            marks: 0,
            holes,
        },
        (
            Phase::Switching {
                pending,
                marks,
                holes,
            },
            Event::SwitchMark,
        ) if marks < conns => Phase::Switching {
            pending,
            marks: marks + 1,
            holes,
        },
        (
            Phase::Switching {
                pending: None,
                marks,
                holes,
            },
            Event::Switch(pending),
        ) => Phase::Switching {
            pending: Some(pending),
            marks,
            holes,
        },
        (phase, event) => return Err(out_of_place(&phase, &event)),
    };
    Ok(match next {
        Phase::Preparing {
            stale: Some(stale),
            marks,
        } if marks == conns => Transition::Prepare { stale },
        Phase::Switching {
            pending: Some(pending),
            marks,
            holes,
        } if marks == conns => Transition::Switch { pending, holes },
        other => Transition::Stay(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONNS: usize = 2;

    fn bits(pages: &[u64]) -> PageBitmap {
        let mut b = PageBitmap::new(64);
        for &p in pages {
            b.set(p);
        }
        b
    }

    /// Runs `events` from `phase`, executing transitions as the RAM owner
    /// does (a preparation punches `holes`, a switch is marked by an empty
    /// post-copy state); returns the phase and the transitions seen.
    fn run(mut phase: Phase, events: Vec<Event>) -> Result<(Phase, Vec<&'static str>), PhaseError> {
        let mut seen = Vec::new();
        for e in events {
            phase = match step(phase, e, CONNS, 0)? {
                Transition::Stay(p) => p,
                Transition::Prepare { stale } => {
                    seen.push("prepare");
                    Phase::Prepared { holes: Some(stale) }
                }
                Transition::Switch { pending, holes } => {
                    seen.push(if holes.is_some() {
                        "switch after preparing"
                    } else {
                        "switch"
                    });
                    Phase::PostCopy(Post::for_tests(pending))
                }
            };
        }
        Ok((phase, seen))
    }

    #[test]
    fn a_round_is_drained_once_every_connection_drained_and_storage_is_done() {
        let (mut p, _) = run(
            Phase::default(),
            vec![Event::Drain { round: 3 }, Event::Drain { round: 3 }],
        )
        .unwrap();
        // A storage read still outstanding: the answer waits.
        assert_eq!(p.round_drained(CONNS, 1), None);
        assert_eq!(p.round_drained(CONNS, 0), Some(3));
        // The count starts again.
        assert_eq!(p.round_drained(CONNS, 0), None);
        // One connection only: not yet.
        let (mut p, _) = run(Phase::default(), vec![Event::Drain { round: 4 }]).unwrap();
        assert_eq!(p.round_drained(CONNS, 0), None);
    }

    #[test]
    fn a_third_drain_from_two_connections_is_refused() {
        let e = run(
            Phase::default(),
            vec![
                Event::Drain { round: 0 },
                Event::Drain { round: 0 },
                Event::Drain { round: 0 },
            ],
        )
        .unwrap_err();
        assert_eq!(e.got, "Drain");
    }

    #[test]
    fn the_preparation_waits_for_the_control_half_and_every_mark_in_either_order() {
        for events in [
            vec![
                Event::PrepareSwitch(bits(&[1])),
                Event::PrepareMark,
                Event::PrepareMark,
            ],
            vec![
                Event::PrepareMark,
                Event::PrepareSwitch(bits(&[1])),
                Event::PrepareMark,
            ],
            vec![
                Event::PrepareMark,
                Event::PrepareMark,
                Event::PrepareSwitch(bits(&[1])),
            ],
        ] {
            let (p, seen) = run(Phase::default(), events).unwrap();
            assert_eq!(seen, ["prepare"]);
            assert!(p.is_prepared());
        }
        // One mark short: still preparing.
        let (p, seen) = run(
            Phase::default(),
            vec![Event::PrepareSwitch(bits(&[1])), Event::PrepareMark],
        )
        .unwrap();
        assert!(seen.is_empty());
        assert!(matches!(p, Phase::Preparing { marks: 1, .. }));
    }

    #[test]
    fn a_switch_before_every_mark_waits_for_the_marks() {
        let (p, seen) = run(
            Phase::Prepared {
                holes: Some(bits(&[])),
            },
            vec![Event::Switch(bits(&[7])), Event::SwitchMark],
        )
        .unwrap();
        assert!(seen.is_empty(), "switched before every mark: {seen:?}");
        assert!(matches!(p, Phase::Switching { marks: 1, .. }));
        let (p, seen) = run(p, vec![Event::SwitchMark]).unwrap();
        assert_eq!(seen, ["switch after preparing"]);
        assert!(p.post().is_some_and(|post| post.missing.get(7)));
    }

    #[test]
    fn marks_before_the_switch_wait_for_its_bitmap() {
        let (p, seen) = run(Phase::default(), vec![Event::SwitchMark, Event::SwitchMark]).unwrap();
        assert!(seen.is_empty());
        let (p, seen) = run(p, vec![Event::Switch(bits(&[2]))]).unwrap();
        // Without a preparation, no holes to spare.
        assert_eq!(seen, ["switch"]);
        assert!(p.post().is_some());
    }

    #[test]
    fn out_of_place_messages_are_one_typed_error() {
        let cases: Vec<(Phase, Event, &str)> = vec![
            // A round still draining: no preparation, no switch.
            (
                Phase::Rounds {
                    drains: 1,
                    round: 0,
                },
                Event::PrepareMark,
                "receiving rounds",
            ),
            (
                Phase::Rounds {
                    drains: 1,
                    round: 0,
                },
                Event::Switch(bits(&[])),
                "receiving rounds",
            ),
            // Twice the control half.
            (
                Phase::Preparing {
                    stale: Some(bits(&[])),
                    marks: 0,
                },
                Event::PrepareSwitch(bits(&[])),
                "preparing the switch to post-copy",
            ),
            // A switch mark before the preparation is answered.
            (
                Phase::Preparing {
                    stale: Some(bits(&[])),
                    marks: 1,
                },
                Event::SwitchMark,
                "preparing the switch to post-copy",
            ),
            // No rounds once prepared.
            (
                Phase::Prepared { holes: None },
                Event::Drain { round: 1 },
                "prepared for the switch",
            ),
            // A stream cannot end mid-switch.
            (
                Phase::Switching {
                    pending: None,
                    marks: 1,
                    holes: None,
                },
                Event::End,
                "switching to post-copy",
            ),
            // Nothing moves post-copy on but its pages.
            (
                Phase::PostCopy(Post::for_tests(bits(&[]))),
                Event::Switch(bits(&[])),
                "in post-copy",
            ),
            (
                Phase::PostCopy(Post::for_tests(bits(&[]))),
                Event::Drain { round: 0 },
                "in post-copy",
            ),
        ];
        for (phase, event, name) in cases {
            let got = event.name();
            let e = step(phase, event, CONNS, 0).unwrap_err();
            assert_eq!(e, PhaseError { got, phase: name });
            assert!(e.to_string().contains(got));
        }
    }

    #[test]
    fn streams_end_after_the_rounds_or_in_post_copy_and_never_twice_per_connection() {
        assert!(step(Phase::default(), Event::End, CONNS, 1).is_ok());
        assert!(step(Phase::default(), Event::End, CONNS, 3).is_err());
        let post = Phase::PostCopy(Post::for_tests(bits(&[])));
        assert!(matches!(
            step(post, Event::End, CONNS, 2),
            Ok(Transition::Stay(Phase::PostCopy(_)))
        ));
    }
}
