//! The agent's states, events and transitions: one table, one [`apply`].
//!
//! Modelled on the reference C agent (`ota.c`, `otaTransitionTable`, data-plane reference
//! §4.2): the same states with the same numbers (`OtaState_t`), the same events
//! (`OtaEvent_t`) and the same rows. A row names the handler that runs and the state the
//! agent moves to when the handler succeeds; a handler that fails leaves the state
//! unchanged, and an event without a row is dropped (a dropped file block counts in
//! [`crate::Statistics::packets_dropped`]).
//!
//! Two deliberate differences, both about the pseudo-state `All` of the C table:
//! - `All` does not include [`AgentState::Init`], [`AgentState::Stopped`] or
//!   [`AgentState::ShuttingDown`]: a stopped agent processes nothing, and one that is
//!   shutting down accepts only [`AgentEvent::Shutdown`] (in C a Suspend queued behind a
//!   shutdown could resurrect the agent as Suspended).
//! - There is no `NoTransition`/`All` value in [`AgentState`]; the table has its own
//!   selector type, [`Source`].
//!
//! And one added row: WaitingForJob × RequestJobDocument asks again (the C table drops it, so
//! `OTA_CheckForUpdate` does nothing while the agent waits for an answer that was lost).

use std::fmt;

/// The agent's state (`OtaState_t`; same order and numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum AgentState {
    /// Created, event loop not running yet.
    Init = 0,
    /// Event loop running, waiting for [`AgentEvent::Start`].
    Ready = 1,
    /// About to ask the service for the next job.
    RequestingJob = 2,
    /// Asked (`$next/get`), waiting for a job document (or `notify-next`).
    WaitingForJob = 3,
    /// A job was accepted; creating (or reopening) the receive file.
    CreatingFile = 4,
    /// About to ask for file blocks.
    RequestingFileBlock = 5,
    /// Asked for blocks, waiting for them.
    WaitingForFileBlock = 6,
    /// Never entered by the table, as in the C agent (closing happens while
    /// ingesting the last block); kept so the numbers match `OtaState_t`.
    ClosingFile = 7,
    /// Suspended by the application; resumes with [`AgentEvent::Resume`].
    Suspended = 8,
    /// Shutdown requested, not yet processed.
    ShuttingDown = 9,
    /// Stopped; the event loop has returned.
    Stopped = 10,
}

impl AgentState {
    /// Every state, in numeric order.
    pub const ALL: &'static [AgentState] = &[
        AgentState::Init,
        AgentState::Ready,
        AgentState::RequestingJob,
        AgentState::WaitingForJob,
        AgentState::CreatingFile,
        AgentState::RequestingFileBlock,
        AgentState::WaitingForFileBlock,
        AgentState::ClosingFile,
        AgentState::Suspended,
        AgentState::ShuttingDown,
        AgentState::Stopped,
    ];

    /// The C agent's name for the state (`OtaAgentStateReady`, ...).
    pub fn name(self) -> &'static str {
        match self {
            AgentState::Init => "Init",
            AgentState::Ready => "Ready",
            AgentState::RequestingJob => "RequestingJob",
            AgentState::WaitingForJob => "WaitingForJob",
            AgentState::CreatingFile => "CreatingFile",
            AgentState::RequestingFileBlock => "RequestingFileBlock",
            AgentState::WaitingForFileBlock => "WaitingForFileBlock",
            AgentState::ClosingFile => "ClosingFile",
            AgentState::Suspended => "Suspended",
            AgentState::ShuttingDown => "ShuttingDown",
            AgentState::Stopped => "Stopped",
        }
    }

    /// The state with this number (for atomics).
    pub fn from_u8(n: u8) -> Option<AgentState> {
        AgentState::ALL.get(usize::from(n)).copied()
    }
}

impl fmt::Display for AgentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An event for the state machine (`OtaEvent_t`; same order and numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum AgentEvent {
    /// Start the agent (checks for a pending self-test, then asks for a job).
    Start = 0,
    /// The job document says the running image is under test.
    StartSelfTest = 1,
    /// Ask the service for the next job (`$next/get`).
    RequestJobDocument = 2,
    /// A job document arrived (`$next/get/accepted` or `notify-next`).
    ReceivedJobDocument = 3,
    /// Create (or reopen) the receive file and subscribe to the data topic.
    CreateFile = 4,
    /// Ask for the next blocks.
    RequestFileBlock = 5,
    /// A file block arrived.
    ReceivedFileBlock = 6,
    /// The request timer expired without progress.
    RequestTimer = 7,
    /// The transfer is over (complete or failed): release it.
    CloseFile = 8,
    /// Suspend all operations.
    Suspend = 9,
    /// Resume after [`AgentEvent::Suspend`].
    Resume = 10,
    /// Abort the active job.
    UserAbort = 11,
    /// Stop the agent.
    Shutdown = 12,
}

impl AgentEvent {
    /// Every event, in numeric order.
    pub const ALL: &'static [AgentEvent] = &[
        AgentEvent::Start,
        AgentEvent::StartSelfTest,
        AgentEvent::RequestJobDocument,
        AgentEvent::ReceivedJobDocument,
        AgentEvent::CreateFile,
        AgentEvent::RequestFileBlock,
        AgentEvent::ReceivedFileBlock,
        AgentEvent::RequestTimer,
        AgentEvent::CloseFile,
        AgentEvent::Suspend,
        AgentEvent::Resume,
        AgentEvent::UserAbort,
        AgentEvent::Shutdown,
    ];

    /// The C agent's name for the event (`OtaAgentEventStart`, ...).
    pub fn name(self) -> &'static str {
        match self {
            AgentEvent::Start => "Start",
            AgentEvent::StartSelfTest => "StartSelfTest",
            AgentEvent::RequestJobDocument => "RequestJobDocument",
            AgentEvent::ReceivedJobDocument => "ReceivedJobDocument",
            AgentEvent::CreateFile => "CreateFile",
            AgentEvent::RequestFileBlock => "RequestFileBlock",
            AgentEvent::ReceivedFileBlock => "ReceivedFileBlock",
            AgentEvent::RequestTimer => "RequestTimer",
            AgentEvent::CloseFile => "CloseFile",
            AgentEvent::Suspend => "Suspend",
            AgentEvent::Resume => "Resume",
            AgentEvent::UserAbort => "UserAbort",
            AgentEvent::Shutdown => "Shutdown",
        }
    }
}

impl fmt::Display for AgentEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What runs for a row (the C agent's handler functions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Handler {
    /// `startHandler`: start the self-test timer if the platform image is pending
    /// commit, then queue [`AgentEvent::RequestJobDocument`].
    Start,
    /// `requestJobHandler`: subscribe to `notify-next`, publish `$next/get`.
    RequestJob,
    /// `processJobHandler`: parse and validate the document, then queue
    /// [`AgentEvent::CreateFile`] or [`AgentEvent::StartSelfTest`].
    ProcessJob,
    /// `inSelfTestHandler`: the version check and `self_test: active`.
    InSelfTest,
    /// `initFileHandler`: create or reopen the file, subscribe to the data topic.
    InitFile,
    /// `requestDataHandler`: publish a GetStream request for missing blocks.
    RequestData,
    /// `processDataHandler`: ingest one block; on the last, close, verify and report.
    ProcessData,
    /// `jobNotificationHandler`: a different job replaced the active one.
    JobNotification,
    /// `closeFileHandler`: release the transfer (unsubscribe, PAL abort).
    CloseFile,
    /// `suspendHandler`.
    Suspend,
    /// `resumeHandler`: queue [`AgentEvent::RequestJobDocument`].
    Resume,
    /// `userAbortHandler`: abort the active job.
    UserAbort,
    /// `shutdownHandler`.
    Shutdown,
}

/// Which states a row applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Exactly this state.
    State(AgentState),
    /// Any running state: all but Init, ShuttingDown and Stopped.
    Any,
}

impl Source {
    fn matches(self, state: AgentState) -> bool {
        match self {
            Source::State(s) => s == state,
            Source::Any => !matches!(
                state,
                AgentState::Init | AgentState::ShuttingDown | AgentState::Stopped
            ),
        }
    }
}

/// One row: in `from`, on `event`, run `handler`; on success move to `next`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: Source,
    pub event: AgentEvent,
    pub handler: Handler,
    pub next: AgentState,
}

const fn row(from: Source, event: AgentEvent, handler: Handler, next: AgentState) -> Transition {
    Transition {
        from,
        event,
        handler,
        next,
    }
}

use AgentEvent as E;
use AgentState as S;
use Source::{Any, State as In};

/// The transition table. The first matching row wins.
pub const TABLE: &[Transition] = &[
    row(In(S::Ready), E::Start, Handler::Start, S::RequestingJob),
    row(
        In(S::RequestingJob),
        E::RequestJobDocument,
        Handler::RequestJob,
        S::WaitingForJob,
    ),
    row(
        In(S::RequestingJob),
        E::RequestTimer,
        Handler::RequestJob,
        S::WaitingForJob,
    ),
    row(
        In(S::WaitingForJob),
        E::ReceivedJobDocument,
        Handler::ProcessJob,
        S::CreatingFile,
    ),
    // Not in the C table: lets `check_for_update` re-ask while waiting.
    row(
        In(S::WaitingForJob),
        E::RequestJobDocument,
        Handler::RequestJob,
        S::WaitingForJob,
    ),
    row(
        In(S::CreatingFile),
        E::StartSelfTest,
        Handler::InSelfTest,
        S::WaitingForJob,
    ),
    row(
        In(S::CreatingFile),
        E::CreateFile,
        Handler::InitFile,
        S::RequestingFileBlock,
    ),
    row(
        In(S::CreatingFile),
        E::RequestTimer,
        Handler::InitFile,
        S::RequestingFileBlock,
    ),
    row(
        In(S::RequestingFileBlock),
        E::RequestFileBlock,
        Handler::RequestData,
        S::WaitingForFileBlock,
    ),
    row(
        In(S::RequestingFileBlock),
        E::RequestTimer,
        Handler::RequestData,
        S::WaitingForFileBlock,
    ),
    row(
        In(S::WaitingForFileBlock),
        E::ReceivedFileBlock,
        Handler::ProcessData,
        S::WaitingForFileBlock,
    ),
    row(
        In(S::WaitingForFileBlock),
        E::RequestTimer,
        Handler::RequestData,
        S::WaitingForFileBlock,
    ),
    row(
        In(S::WaitingForFileBlock),
        E::RequestFileBlock,
        Handler::RequestData,
        S::WaitingForFileBlock,
    ),
    row(
        In(S::WaitingForFileBlock),
        E::RequestJobDocument,
        Handler::RequestJob,
        S::WaitingForJob,
    ),
    row(
        In(S::WaitingForFileBlock),
        E::ReceivedJobDocument,
        Handler::JobNotification,
        S::RequestingJob,
    ),
    row(
        In(S::WaitingForFileBlock),
        E::CloseFile,
        Handler::CloseFile,
        S::WaitingForJob,
    ),
    row(
        In(S::Suspended),
        E::Resume,
        Handler::Resume,
        S::RequestingJob,
    ),
    row(Any, E::Suspend, Handler::Suspend, S::Suspended),
    row(Any, E::UserAbort, Handler::UserAbort, S::WaitingForJob),
    row(Any, E::Shutdown, Handler::Shutdown, S::Stopped),
    // A shutdown requested through the API marks the agent ShuttingDown first.
    row(
        In(S::ShuttingDown),
        E::Shutdown,
        Handler::Shutdown,
        S::Stopped,
    ),
];

/// The row for `event` in `state`: the handler to run and the state after it succeeds.
/// `None` means the event is dropped.
pub fn apply(state: AgentState, event: AgentEvent) -> Option<(Handler, AgentState)> {
    TABLE
        .iter()
        .find(|t| t.event == event && t.from.matches(state))
        .map(|t| (t.handler, t.next))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The transitions stated independently of the table, as the reference lists them
    /// (data-plane reference §4.2), for the exhaustive comparison.
    fn expected(state: S, event: E) -> Option<(Handler, S)> {
        use Handler as H;
        let running = !matches!(state, S::Init | S::ShuttingDown | S::Stopped);
        match (state, event) {
            (S::Ready, E::Start) => Some((H::Start, S::RequestingJob)),
            (S::RequestingJob, E::RequestJobDocument | E::RequestTimer) => {
                Some((H::RequestJob, S::WaitingForJob))
            }
            (S::WaitingForJob, E::ReceivedJobDocument) => Some((H::ProcessJob, S::CreatingFile)),
            (S::WaitingForJob, E::RequestJobDocument) => Some((H::RequestJob, S::WaitingForJob)),
            (S::CreatingFile, E::StartSelfTest) => Some((H::InSelfTest, S::WaitingForJob)),
            (S::CreatingFile, E::CreateFile | E::RequestTimer) => {
                Some((H::InitFile, S::RequestingFileBlock))
            }
            (S::RequestingFileBlock, E::RequestFileBlock | E::RequestTimer) => {
                Some((H::RequestData, S::WaitingForFileBlock))
            }
            (S::WaitingForFileBlock, E::ReceivedFileBlock) => {
                Some((H::ProcessData, S::WaitingForFileBlock))
            }
            (S::WaitingForFileBlock, E::RequestTimer | E::RequestFileBlock) => {
                Some((H::RequestData, S::WaitingForFileBlock))
            }
            (S::WaitingForFileBlock, E::RequestJobDocument) => {
                Some((H::RequestJob, S::WaitingForJob))
            }
            (S::WaitingForFileBlock, E::ReceivedJobDocument) => {
                Some((H::JobNotification, S::RequestingJob))
            }
            (S::WaitingForFileBlock, E::CloseFile) => Some((H::CloseFile, S::WaitingForJob)),
            (S::Suspended, E::Resume) => Some((H::Resume, S::RequestingJob)),
            (_, E::Suspend) if running => Some((H::Suspend, S::Suspended)),
            (_, E::UserAbort) if running => Some((H::UserAbort, S::WaitingForJob)),
            (S::ShuttingDown, E::Shutdown) => Some((H::Shutdown, S::Stopped)),
            (_, E::Shutdown) if running => Some((H::Shutdown, S::Stopped)),
            _ => None,
        }
    }

    #[test]
    fn every_state_times_every_event() {
        let mut handled = 0;
        for &state in S::ALL {
            for &event in E::ALL {
                let got = apply(state, event);
                assert_eq!(got, expected(state, event), "{state} x {event}");
                if got.is_some() {
                    handled += 1;
                }
            }
        }
        // 17 specific pairs (16 from C, 1 added), plus Suspend/UserAbort/Shutdown in the
        // 8 running states, plus Shutdown while ShuttingDown.
        assert_eq!(handled, 17 + 3 * 8 + 1);
        assert_eq!(S::ALL.len() * E::ALL.len(), 143);
    }

    #[test]
    fn stopped_and_init_process_nothing() {
        for &event in E::ALL {
            assert_eq!(apply(S::Stopped, event), None, "{event}");
            assert_eq!(apply(S::Init, event), None, "{event}");
        }
    }

    #[test]
    fn every_row_is_reachable() {
        // A row shadowed by an earlier one would be dead code.
        for (i, t) in TABLE.iter().enumerate() {
            let states: Vec<S> = S::ALL
                .iter()
                .copied()
                .filter(|s| t.from.matches(*s))
                .collect();
            assert!(
                states
                    .iter()
                    .any(|s| apply(*s, t.event) == Some((t.handler, t.next))),
                "row {i} ({:?} x {}) is shadowed",
                t.from,
                t.event
            );
        }
    }

    #[test]
    fn numbers_and_names_match_the_c_agent() {
        for (i, s) in S::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
            assert_eq!(S::from_u8(i as u8), Some(*s));
            assert_eq!(s.to_string(), s.name());
        }
        assert_eq!(S::from_u8(11), None);
        for (i, e) in E::ALL.iter().enumerate() {
            assert_eq!(*e as usize, i);
            assert_eq!(e.to_string(), e.name());
        }
        assert_eq!(S::WaitingForFileBlock as u8, 6);
        assert_eq!(E::Shutdown as u8, 12);
    }
}
