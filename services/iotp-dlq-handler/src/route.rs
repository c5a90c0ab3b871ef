//! Where a dead letter goes next.

use iotp_core::kafka::sink::UNPRODUCIBLE_REASONS;

/// The decision for one dead letter arriving on the incoming queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// It came back from a retry delay queue: put the original back on its Kafka topic.
    ReplayNow,
    /// Transient with attempts left: wait in delay queue `attempt` (1-based).
    Retry {
        /// Delay queue number.
        attempt: usize,
    },
    /// Permanent, or out of attempts: park and archive.
    Park,
}

/// Whether a dead letter is worth retrying: the stage flagged it transient (`x-transient`) or
/// its reason is configured as transient — never a record Kafka refused for good
/// (`output_too_large`, `output_rejected`): replaying it would only be refused again.
pub fn is_transient(flagged: bool, reason: &str, transient_reasons: &[String]) -> bool {
    if UNPRODUCIBLE_REASONS.contains(&reason) {
        return false;
    }
    flagged || transient_reasons.iter().any(|r| r == reason)
}

/// Decide. `attempts` is how often the stage has failed it (1 on the first failure);
/// `retries` is the number of delay queues.
pub fn route(attempts: i32, transient: bool, due: bool, retries: usize) -> Route {
    if due {
        return Route::ReplayNow;
    }
    match usize::try_from(attempts) {
        Ok(n) if transient && n >= 1 && n <= retries => Route::Retry { attempt: n },
        _ => Route::Park,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_retries_with_growing_delays_then_parks() {
        let decisions: Vec<Route> = (1..=6).map(|a| route(a, true, false, 5)).collect();
        assert_eq!(
            decisions,
            vec![
                Route::Retry { attempt: 1 },
                Route::Retry { attempt: 2 },
                Route::Retry { attempt: 3 },
                Route::Retry { attempt: 4 },
                Route::Retry { attempt: 5 },
                Route::Park
            ]
        );
    }

    #[test]
    fn records_kafka_refused_for_good_are_never_transient() {
        let configured = vec![
            "store_unavailable".to_string(),
            "output_too_large".to_string(),
        ];
        assert!(is_transient(false, "store_unavailable", &configured));
        assert!(is_transient(true, "registry_unavailable", &[]));
        assert!(!is_transient(false, "unknown_device", &configured));
        for reason in ["output_too_large", "output_rejected"] {
            assert!(!is_transient(true, reason, &configured), "{reason}");
            assert_eq!(
                route(1, is_transient(true, reason, &configured), false, 5),
                Route::Park,
                "{reason} parks at once"
            );
        }
    }

    #[test]
    fn permanent_parks_at_once_and_due_ones_replay() {
        assert_eq!(route(1, false, false, 5), Route::Park);
        assert_eq!(route(3, true, true, 5), Route::ReplayNow);
        assert_eq!(
            route(0, true, false, 5),
            Route::Park,
            "nonsense attempts are not retried forever"
        );
    }
}
