//! Where a dead letter goes next.

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
