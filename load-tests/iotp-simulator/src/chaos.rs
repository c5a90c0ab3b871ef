//! Chaos: what a scenario's `[chaos]` section asks to break while the fleet publishes, and
//! what each break cost ([`recovery`]).
//!
//! The timeline is one line per action, at an offset from the fleet's first publish:
//!
//! ```toml
//! [chaos]
//! replicas = { mqtt-bridge = 2 }      # replicas at the start (default 1 each)
//! timeline = [
//!   "20s scale parser 3",             # start or gracefully stop replicas (highest index first)
//!   "35s kill enricher",              # kill -9 a random replica, start it again with its name
//!   "50s kill tansu",                 # kill -9 the Kafka-protocol broker, start it again
//!   "65s restart rabbitmq",           # stop_app / start_app of the run's own RabbitMQ node
//!   "80s restart mosquitto",          # SIGTERM the run's own Mosquitto, start it again
//! ]
//! ```
//!
//! The executing side is [`crate::load`]'s chaos phase and [`crate::stack`]'s operations.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::stack::SERVICES;

pub mod recovery;

/// Most replicas a service may be scaled to (admin ports are laid out for this many).
pub const MAX_REPLICAS: usize = 8;

/// A scenario's `[chaos]` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Chaos {
    /// Replicas of each service at the start, by service name (default 1).
    pub replicas: BTreeMap<String, usize>,
    /// `"<offset> <action> [target] [n]"`, one per action (see the module's doc).
    pub timeline: Vec<String>,
}

/// One thing to break.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Action {
    /// Scale a service to this many replicas.
    Scale(String, usize),
    /// `kill -9` a random replica of a service and start it again with the same name.
    Kill(String),
    /// `kill -9` Tansu and start it again on the same SQLite file and port.
    KillTansu,
    /// Stop and start the RabbitMQ application (the run's own node).
    RestartRabbitmq,
    /// SIGTERM Mosquitto (it saves its sessions) and start it again with the same config.
    RestartMosquitto,
}

impl Action {
    /// The service (or broker) this action hits.
    pub fn target(&self) -> &str {
        match self {
            Action::Scale(s, _) | Action::Kill(s) => s,
            Action::KillTansu => "tansu",
            Action::RestartRabbitmq => "rabbitmq",
            Action::RestartMosquitto => "mosquitto",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Scale(s, n) => write!(f, "scale {s} {n}"),
            Action::Kill(s) => write!(f, "kill {s}"),
            Action::KillTansu => write!(f, "kill tansu"),
            Action::RestartRabbitmq => write!(f, "restart rabbitmq"),
            Action::RestartMosquitto => write!(f, "restart mosquitto"),
        }
    }
}

/// An action at its offset from the fleet's first publish.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Step {
    /// Offset from the first publish.
    pub at: Duration,
    /// What to do.
    pub action: Action,
}

impl FromStr for Step {
    type Err = String;

    fn from_str(line: &str) -> Result<Self, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [at, verb, rest @ ..] = words.as_slice() else {
            return Err(format!("`{line}`: expected `<offset> <action> …`"));
        };
        let at =
            humantime::parse_duration(at).map_err(|e| format!("`{line}`: offset `{at}`: {e}"))?;
        let service = |name: &str| -> Result<String, String> {
            if SERVICES.contains(&name) {
                Ok(name.to_string())
            } else {
                Err(format!(
                    "`{line}`: `{name}` is not a service: one of {}",
                    SERVICES.join(", ")
                ))
            }
        };
        let action = match (*verb, rest) {
            ("scale", [name, n]) => {
                let n: usize = n
                    .parse()
                    .map_err(|_| format!("`{line}`: `{n}` is not a replica count"))?;
                if !(1..=MAX_REPLICAS).contains(&n) {
                    return Err(format!("`{line}`: replicas must be 1 to {MAX_REPLICAS}"));
                }
                Action::Scale(service(name)?, n)
            }
            ("kill", ["tansu"]) => Action::KillTansu,
            ("kill", [name]) => Action::Kill(service(name)?),
            ("restart", ["rabbitmq"]) => Action::RestartRabbitmq,
            ("restart", ["mosquitto"]) => Action::RestartMosquitto,
            _ => {
                return Err(format!(
                    "`{line}`: expected `scale SERVICE N`, `kill SERVICE`, `kill tansu`, `restart rabbitmq` or `restart mosquitto`"
                ))
            }
        };
        Ok(Step { at, action })
    }
}

impl Chaos {
    /// Whether there is anything to break.
    pub fn is_empty(&self) -> bool {
        self.timeline.is_empty()
    }

    /// The timeline, parsed and in time order (a stable sort: same-time actions keep their
    /// order).
    pub fn steps(&self) -> Result<Vec<Step>, Vec<String>> {
        let mut steps = Vec::new();
        let mut problems = Vec::new();
        for line in &self.timeline {
            match line.parse::<Step>() {
                Ok(s) => steps.push(s),
                Err(e) => problems.push(e),
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        steps.sort_by_key(|s| s.at);
        Ok(steps)
    }

    /// Replicas of `service` at the start.
    pub fn initial_replicas(&self, service: &str) -> usize {
        self.replicas.get(service).copied().unwrap_or(1)
    }

    /// Whether the run needs a Mosquitto of its own (it restarts it: never the shared one).
    pub fn restarts_mosquitto(&self) -> bool {
        self.steps()
            .is_ok_and(|s| s.iter().any(|s| s.action == Action::RestartMosquitto))
    }

    /// Whether the run needs a RabbitMQ node of its own (it restarts it: never the shared one).
    pub fn restarts_rabbitmq(&self) -> bool {
        self.steps()
            .is_ok_and(|s| s.iter().any(|s| s.action == Action::RestartRabbitmq))
    }

    /// What is wrong with the section, every problem at once.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, n) in &self.replicas {
            if !SERVICES.contains(&name.as_str()) {
                out.push(format!("chaos.replicas: `{name}` is not a service"));
            }
            if !(1..=MAX_REPLICAS).contains(n) {
                out.push(format!(
                    "chaos.replicas.{name}: must be 1 to {MAX_REPLICAS}"
                ));
            }
        }
        // The DLQ handler serves the dead-letter API on one port: one replica only.
        let dlq_scaled = self.replicas.get("dlq-handler").is_some_and(|n| *n > 1)
            || self.steps().is_ok_and(|s| {
                s.iter().any(
                    |s| matches!(&s.action, Action::Scale(n, r) if n == "dlq-handler" && *r > 1),
                )
            });
        if dlq_scaled {
            out.push(
                "chaos: dlq-handler runs one replica (its dead-letter API has one port)".into(),
            );
        }
        if let Err(e) = self.steps() {
            out.extend(e.into_iter().map(|e| format!("chaos.timeline: {e}")));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_parses_and_the_timeline_comes_out_in_time_order() {
        let chaos = Chaos {
            replicas: BTreeMap::from([("mqtt-bridge".into(), 2)]),
            timeline: vec![
                "1m kill tansu".into(),
                "20s scale parser 3".into(),
                "35s   kill enricher".into(),
                "20s restart rabbitmq".into(),
                "80s restart mosquitto".into(),
            ],
        };
        assert!(chaos.problems().is_empty(), "{:?}", chaos.problems());
        let steps = chaos.steps().expect("steps");
        let at: Vec<u64> = steps.iter().map(|s| s.at.as_secs()).collect();
        assert_eq!(at, [20, 20, 35, 60, 80]);
        assert_eq!(steps[0].action, Action::Scale("parser".into(), 3));
        assert_eq!(steps[1].action, Action::RestartRabbitmq, "stable order");
        assert_eq!(steps[2].action, Action::Kill("enricher".into()));
        assert_eq!(steps[3].action, Action::KillTansu);
        assert_eq!(steps[4].action.to_string(), "restart mosquitto");
        assert!(chaos.restarts_mosquitto() && chaos.restarts_rabbitmq());
        assert_eq!(chaos.initial_replicas("mqtt-bridge"), 2);
        assert_eq!(chaos.initial_replicas("parser"), 1);
    }

    #[test]
    fn a_wrong_line_is_refused_with_its_reason_and_every_problem_is_listed() {
        for (line, says) in [
            ("kill", "expected `<offset> <action>"),
            ("kill parser", "offset `kill`"),
            ("soon kill parser", "offset `soon`"),
            ("5s kill parsr", "not a service"),
            ("5s scale parser", "expected `scale SERVICE N`"),
            ("5s scale parser 0", "1 to 8"),
            ("5s scale parser many", "not a replica count"),
            ("5s restart tansu", "expected"),
        ] {
            let e = line.parse::<Step>().expect_err(line);
            assert!(e.contains(says), "{line}: {e}");
        }
        let chaos = Chaos {
            replicas: BTreeMap::from([("nope".into(), 0)]),
            timeline: vec!["x".into(), "5s restart mosquitto".into()],
        };
        assert_eq!(chaos.problems().len(), 3, "{:?}", chaos.problems());
        assert!(
            !chaos.restarts_mosquitto(),
            "an invalid timeline restarts nothing"
        );
        let dlq = Chaos {
            timeline: vec!["5s scale dlq-handler 2".into()],
            ..Chaos::default()
        };
        assert_eq!(dlq.problems().len(), 1, "one dead-letter API port");
    }
}
