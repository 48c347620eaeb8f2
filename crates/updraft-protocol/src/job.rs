//! Job and job-execution states, and the execution state machine as one table.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $wire:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
        pub enum $name {
            $(#[serde(rename = $wire)] $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The value as it appears on the wire.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $wire),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($wire => Ok($name::$variant),)+
                    _ => Err(UnknownValue {
                        value: s.to_owned(),
                        allowed: &[$($wire),+],
                    }),
                }
            }
        }
    };
}

/// A string that is not one of an enum's wire values.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("'{value}' is not one of [{}]", allowed.join(", "))]
pub struct UnknownValue {
    pub value: String,
    pub allowed: &'static [&'static str],
}

wire_enum!(
    /// The status of a job (`JobStatus` in the IoT model; there is no QUEUED).
    JobStatus {
        InProgress = "IN_PROGRESS",
        Canceled = "CANCELED",
        Completed = "COMPLETED",
        DeletionInProgress = "DELETION_IN_PROGRESS",
        Scheduled = "SCHEDULED",
    }
);

wire_enum!(
    /// The status of one job execution.
    ExecutionStatus {
        Queued = "QUEUED",
        InProgress = "IN_PROGRESS",
        Succeeded = "SUCCEEDED",
        Failed = "FAILED",
        TimedOut = "TIMED_OUT",
        Rejected = "REJECTED",
        Removed = "REMOVED",
        Canceled = "CANCELED",
    }
);

wire_enum!(
    /// SNAPSHOT jobs target the things present at creation; CONTINUOUS ones also later members.
    TargetSelection {
        Continuous = "CONTINUOUS",
        Snapshot = "SNAPSHOT",
    }
);

wire_enum!(
    /// The life cycle of an OTA update.
    OtaUpdateStatus {
        CreatePending = "CREATE_PENDING",
        CreateInProgress = "CREATE_IN_PROGRESS",
        CreateComplete = "CREATE_COMPLETE",
        CreateFailed = "CREATE_FAILED",
        DeleteInProgress = "DELETE_IN_PROGRESS",
        DeleteFailed = "DELETE_FAILED",
    }
);

wire_enum!(
    /// Abort-criteria and retry failure types.
    FailureType {
        Failed = "FAILED",
        Rejected = "REJECTED",
        TimedOut = "TIMED_OUT",
        All = "ALL",
    }
);

wire_enum!(
    /// OTA delivery protocols.
    Protocol {
        Mqtt = "MQTT",
        Http = "HTTP",
    }
);

impl JobStatus {
    /// A job that can no longer change through device activity.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Canceled | JobStatus::Completed)
    }
}

/// Who asks for an execution to change state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Actor {
    /// The device, through the Jobs MQTT API or iot-jobs-data.
    Device,
    /// The service: cancel, timeouts, continuous-group removal.
    Service,
    /// The service acting with `force` (e.g. CancelJob force=true).
    ServiceForced,
}

/// Why a transition was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TransitionError {
    #[error("the execution is in the terminal state {0} and cannot change")]
    Terminal(ExecutionStatus),
    #[error("an execution cannot move from {from} to {to}")]
    NotAllowed {
        from: ExecutionStatus,
        to: ExecutionStatus,
    },
}

impl ExecutionStatus {
    /// Terminal states never change again.
    pub fn is_terminal(self) -> bool {
        !matches!(self, ExecutionStatus::Queued | ExecutionStatus::InProgress)
    }

    /// The execution state machine: may `actor` move an execution from `self` to `to`?
    ///
    /// This table is the single source of truth for execution transitions
    /// (see the data-plane reference, §1.6).
    pub fn transition(
        self,
        to: ExecutionStatus,
        actor: Actor,
    ) -> Result<ExecutionStatus, TransitionError> {
        use ExecutionStatus as S;
        if self.is_terminal() {
            return Err(TransitionError::Terminal(self));
        }
        let allowed = match (actor, self, to) {
            // Devices report progress and outcomes.
            (
                Actor::Device,
                S::Queued | S::InProgress,
                S::InProgress | S::Succeeded | S::Failed,
            ) => true,
            // A device may refuse a job it has not started.
            (Actor::Device, S::Queued, S::Rejected) => true,
            // The service cancels or removes queued work; in-progress work only with force.
            (Actor::Service | Actor::ServiceForced, S::Queued, S::Canceled | S::Removed) => true,
            (Actor::ServiceForced, S::InProgress, S::Canceled | S::Removed) => true,
            // Timers only run on started executions.
            (Actor::Service | Actor::ServiceForced, S::InProgress, S::TimedOut) => true,
            _ => false,
        };
        if allowed {
            Ok(to)
        } else {
            Err(TransitionError::NotAllowed { from: self, to })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip() {
        for s in ExecutionStatus::ALL {
            assert_eq!(s.as_str().parse::<ExecutionStatus>(), Ok(*s));
            let json = serde_json::to_string(s).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
        }
        assert!("QUEUED".parse::<JobStatus>().is_err());
        let err = "nope".parse::<TargetSelection>().err();
        assert_eq!(
            err.map(|e| e.to_string()),
            Some("'nope' is not one of [CONTINUOUS, SNAPSHOT]".to_owned())
        );
    }

    /// Every (from, to, actor) combination against an independent statement of the rules.
    #[test]
    fn transition_table_is_exhaustive() {
        use ExecutionStatus as S;
        let actors = [Actor::Device, Actor::Service, Actor::ServiceForced];
        let mut allowed_count = 0;
        for &from in S::ALL {
            for &to in S::ALL {
                for actor in actors {
                    let got = from.transition(to, actor);
                    let expected = if from.is_terminal() {
                        false
                    } else {
                        match actor {
                            Actor::Device => {
                                matches!(to, S::InProgress | S::Succeeded | S::Failed)
                                    || (from == S::Queued && to == S::Rejected)
                            }
                            Actor::Service => {
                                (from == S::Queued && matches!(to, S::Canceled | S::Removed))
                                    || (from == S::InProgress && to == S::TimedOut)
                            }
                            Actor::ServiceForced => {
                                matches!(to, S::Canceled | S::Removed)
                                    || (from == S::InProgress && to == S::TimedOut)
                            }
                        }
                    };
                    assert_eq!(got.is_ok(), expected, "{from} -> {to} by {actor:?}");
                    if from.is_terminal() {
                        assert_eq!(got, Err(TransitionError::Terminal(from)));
                    }
                    if got.is_ok() {
                        allowed_count += 1;
                    }
                }
            }
        }
        assert_eq!(allowed_count, 15);
    }
}
