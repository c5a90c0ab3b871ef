//! The runtime's one backoff policy. Every retry in the pipeline — a batch whose store write
//! failed, outputs Kafka or RabbitMQ refused, a record the bridge could not hand over, an MQTT
//! reconnect, a dead letter the handler could not pass on — waits the same way: exponential
//! from `min` to `max`, and the same work is not retried forever: after `give_up_after` the
//! service stops without acknowledging it (the supervisor restarts it with its own backoff,
//! and the work is consumed again).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::stage::StageError;

/// How failed work is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Backoff {
    /// Delay after the first failure; each further failure of the same work doubles it.
    #[serde(with = "humantime_serde")]
    pub min: Duration,
    /// Longest delay between two attempts.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// How long the same work may keep failing before the service stops instead. MQTT
    /// reconnects keep trying for the life of the process (there is no work in hand).
    #[serde(with = "humantime_serde")]
    pub give_up_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            min: Duration::from_millis(100),
            max: Duration::from_secs(10),
            give_up_after: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// Rules for `validate()`.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.min.is_zero() {
            out.push("common.backoff.min must be > 0".into());
        }
        if self.min > self.max {
            out.push("common.backoff.min must not exceed common.backoff.max".into());
        }
        if self.give_up_after < self.max {
            out.push("common.backoff.give_up_after must be at least common.backoff.max".into());
        }
        out
    }

    /// Start retrying one piece of work.
    pub fn start(&self) -> Retrying {
        Retrying {
            policy: *self,
            delay: self.min,
            since: Instant::now(),
            failures: 0,
        }
    }
}

/// Why retrying ended without success.
#[derive(Debug)]
pub enum Halt {
    /// Shutdown was requested while waiting: leave the work unacknowledged.
    Shutdown,
    /// The work failed for good: a `Stop` error, or `Retry` errors for longer than
    /// `give_up_after`. The service stops.
    Failed(anyhow::Error),
}

/// The state of retrying one piece of work.
#[derive(Debug)]
pub struct Retrying {
    policy: Backoff,
    delay: Duration,
    since: Instant,
    failures: u32,
}

impl Retrying {
    /// The delay before the next attempt; doubles each call up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.delay;
        self.delay = (self.delay * 2).min(self.policy.max);
        self.failures += 1;
        delay
    }

    /// Failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// After a failure of this work: wait for the next attempt, or say why there is none.
    pub async fn wait(
        &mut self,
        shutdown: &CancellationToken,
        error: &(dyn std::fmt::Display + Sync),
    ) -> Result<(), Halt> {
        if self.since.elapsed() >= self.policy.give_up_after {
            return Err(Halt::Failed(anyhow::anyhow!(
                "still failing after {} attempts over {:?}: {error}",
                self.failures + 1,
                self.policy.give_up_after
            )));
        }
        let delay = self.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => Ok(()),
            _ = shutdown.cancelled() => Err(Halt::Shutdown),
        }
    }

    /// Act on one attempt's result: its value, `None` after waiting for the next attempt
    /// (a `Retry` error), or why to stop.
    pub async fn check<T>(
        &mut self,
        result: Result<T, StageError>,
        shutdown: &CancellationToken,
        what: &'static str,
    ) -> Result<Option<T>, Halt> {
        match result {
            Ok(v) => Ok(Some(v)),
            Err(StageError::Stop(e)) => Err(Halt::Failed(e)),
            Err(StageError::Retry(e)) => {
                tracing::warn!(
                    what,
                    error = format!("{e:#}"),
                    failures = self.failures + 1,
                    "failed; retrying"
                );
                self.wait(shutdown, &e).await.map(|()| None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap() {
        let policy = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_millis(350),
            give_up_after: Duration::from_secs(1),
        };
        let mut r = policy.start();
        let delays: Vec<u128> = (0..4).map(|_| r.next_delay().as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 350, 350]);
        assert_eq!(r.failures(), 4);
        assert!(policy.problems().is_empty());
        let broken = Backoff {
            min: Duration::from_secs(2),
            ..policy
        };
        assert_eq!(broken.problems().len(), 1, "{:?}", broken.problems());
    }

    #[tokio::test(start_paused = true)]
    async fn retry_errors_wait_stop_errors_and_old_work_halt() {
        let shutdown = CancellationToken::new();
        let policy = Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_millis(100),
            give_up_after: Duration::from_millis(250),
        };
        let mut r = policy.start();
        let retry = || Err::<(), _>(StageError::retry(anyhow::anyhow!("busy")));
        assert!(matches!(r.check(retry(), &shutdown, "t").await, Ok(None)));
        assert!(matches!(r.check(Ok(7), &shutdown, "t").await, Ok(Some(7))));
        let stop = Err::<(), _>(StageError::stop(anyhow::anyhow!("defect")));
        assert!(matches!(
            r.check(stop, &shutdown, "t").await,
            Err(Halt::Failed(_))
        ));
        // Two more waits pass 250 ms: the third failure gives up.
        assert!(matches!(r.check(retry(), &shutdown, "t").await, Ok(None)));
        assert!(matches!(r.check(retry(), &shutdown, "t").await, Ok(None)));
        assert!(matches!(
            r.check(retry(), &shutdown, "t").await,
            Err(Halt::Failed(_))
        ));
        shutdown.cancel();
        let mut fresh = policy.start();
        assert!(matches!(
            fresh.check(retry(), &shutdown, "t").await,
            Err(Halt::Shutdown)
        ));
    }
}
