//! Who else is in the shared group. Each replica keeps a small second MQTT connection (no
//! session) on which it announces its own state, retained, on `{presence_prefix}/{clientId}`,
//! and follows everyone's. The broker itself announces a vanished replica: the data session's
//! will (`orphaned`, delayed by `orphan_after`) is published when its connection ended without
//! a DISCONNECT and nobody resumed the session in time.
//!
//! The one question that must be answered safely is "may I leave the shared group?": if every
//! replica unsubscribed, the broker would drop the devices' messages (a shared subscription
//! without members matches nothing). A replica announces `leaving` first and waits for the
//! broker's PUBACK, then looks for another replica still `online`. Mosquitto handles publishes
//! one at a time and delivers to a subscriber in order, so of two replicas leaving at once the
//! second to announce sees the first one's `leaving` before its own PUBACK: at least one of them
//! sees no one online and keeps its session.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use tokio::sync::watch;

use crate::mqtt::{MqttConfig, AWAY, ONLINE, ORPHANED};
use crate::retry::Backoff;

/// A replica's last announced state and when this replica learnt it.
#[derive(Debug, Clone)]
struct Seen {
    status: String,
    since: Instant,
}

struct Inner {
    client: AsyncClient,
    prefix: String,
    me: String,
    view: Mutex<BTreeMap<String, Seen>>,
    /// PUBACKs received, by packet id order of arrival (a counter).
    acks: watch::Sender<u64>,
    /// One announcement at a time: each waits for its own PUBACK.
    announcing: tokio::sync::Mutex<()>,
}

/// The presence connection of one replica. Cheap to clone.
#[derive(Clone)]
pub(super) struct Presence(Arc<Inner>);

impl Presence {
    /// Connect (in the background, reconnecting with `backoff`) and follow the group.
    pub fn start(mqtt: &MqttConfig, me: &str, backoff: Backoff) -> anyhow::Result<Self> {
        let (client, eventloop) = mqtt.connect_sessionless(&format!("{me}.presence"), 64)?;
        let (acks, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            client,
            prefix: mqtt.presence_prefix.clone(),
            me: me.to_string(),
            view: Mutex::new(BTreeMap::new()),
            acks,
            announcing: tokio::sync::Mutex::new(()),
        });
        tokio::spawn(follow(eventloop, inner.clone(), backoff));
        Ok(Self(inner))
    }

    /// Announce `status` for this replica, retained; return once the broker took it (or after
    /// a few seconds: presence is advice, the data path never waits on it for long).
    pub async fn announce(&self, status: &str) {
        self.announce_for(&self.0.me.clone(), status).await;
    }

    /// Remove the announcement of `client_id` (its session is gone).
    pub async fn clear(&self, client_id: &str) {
        self.announce_for(client_id, "").await;
    }

    /// Announce `status` for the session `client_id` (one this replica drained).
    pub async fn announce_for(&self, client_id: &str, status: &str) {
        let _one_at_a_time = self.0.announcing.lock().await;
        let mut acks = self.0.acks.subscribe();
        let before = *acks.borrow_and_update();
        let topic = format!("{}/{client_id}", self.0.prefix);
        if let Err(e) = self
            .0
            .client
            .publish(topic, QoS::AtLeastOnce, true, status.as_bytes().to_vec())
            .await
        {
            tracing::warn!(error = %e, status, "cannot announce presence");
            return;
        }
        let confirmed =
            tokio::time::timeout(Duration::from_secs(5), acks.wait_for(|&n| n > before)).await;
        if !matches!(confirmed, Ok(Ok(_))) {
            tracing::warn!(
                status,
                client_id,
                "presence not confirmed by the broker in 5 s"
            );
        }
    }

    /// Another replica announced itself online (and has not announced anything since).
    pub fn others_online(&self) -> bool {
        self.view()
            .iter()
            .any(|(id, seen)| *id != self.0.me && seen.status == ONLINE)
    }

    /// Sessions to take over, if this replica is the one to do it ([`orphans`]).
    pub fn orphans(&self, orphan_after: Duration) -> Vec<String> {
        orphans(&self.view(), &self.0.me, orphan_after)
    }

    /// Disconnect the presence connection.
    pub async fn close(&self) {
        let _ = self.0.client.disconnect().await;
    }

    fn view(&self) -> BTreeMap<String, Seen> {
        match self.0.view.lock() {
            Ok(v) => v.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// Sessions to take over, if `me` is the one to do it: those the broker announced orphaned,
/// and those left `away` for longer than `orphan_after`. The replica with the lowest id among
/// those online does the work, so two survivors do not fight over a session (if they do, the
/// broker lets the later one in and the other gives up).
fn orphans(view: &BTreeMap<String, Seen>, me: &str, orphan_after: Duration) -> Vec<String> {
    let lowest_online = view
        .iter()
        .filter(|(_, seen)| seen.status == ONLINE)
        .map(|(id, _)| id.as_str())
        .chain(std::iter::once(me))
        .min();
    if lowest_online != Some(me) {
        return Vec::new();
    }
    view.iter()
        .filter(|(id, seen)| {
            id.as_str() != me
                && ((seen.status == ORPHANED && seen.since.elapsed() >= settle(orphan_after))
                    || (seen.status == AWAY && seen.since.elapsed() >= orphan_after))
        })
        .map(|(id, _)| id.clone())
        .collect()
}

/// How long an `orphaned` announcement must stand before it is acted on. A broker that
/// shuts down gracefully publishes every connected client's will at once (measured with
/// Mosquitto 2.0.21: both live bridges announced `orphaned`, then `online` again 0.1 s later
/// when they reconnected); taking over a live replica's session would only make the two
/// fight for it.
fn settle(orphan_after: Duration) -> Duration {
    orphan_after.min(Duration::from_secs(5))
}

/// Keep the presence connection up; mirror the retained announcements into the view.
async fn follow(mut eventloop: EventLoop, inner: Arc<Inner>, backoff: Backoff) {
    let filter = format!("{}/+", inner.prefix);
    let mut reconnect = backoff.start();
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                reconnect = backoff.start();
                // The retained announcements come again after the subscription.
                if let Ok(mut v) = inner.view.lock() {
                    v.clear();
                }
                let (client, filter) = (inner.client.clone(), filter.clone());
                tokio::spawn(async move {
                    if let Err(e) = client.subscribe(filter, QoS::AtLeastOnce).await {
                        tracing::warn!(error = %e, "cannot follow presence");
                    }
                });
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let topic = String::from_utf8_lossy(&p.topic);
                let Some(id) = topic
                    .strip_prefix(inner.prefix.as_str())
                    .and_then(|t| t.strip_prefix('/'))
                else {
                    continue;
                };
                let status = String::from_utf8_lossy(&p.payload).trim().to_string();
                if let Ok(mut v) = inner.view.lock() {
                    if status.is_empty() {
                        v.remove(id);
                    } else if v.get(id).map(|s| s.status.as_str()) != Some(status.as_str()) {
                        tracing::info!(replica = id, status, "presence");
                        v.insert(
                            id.to_string(),
                            Seen {
                                status,
                                since: Instant::now(),
                            },
                        );
                    }
                }
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                inner.acks.send_modify(|n| *n += 1);
            }
            Ok(_) => {}
            Err(rumqttc::v5::ConnectionError::RequestsDone) => return,
            Err(e) => {
                let delay = reconnect.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "presence connection lost");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::LEAVING;

    fn view(entries: &[(&str, &str, Duration)]) -> BTreeMap<String, Seen> {
        entries
            .iter()
            .map(|(id, status, age)| {
                let since = Instant::now()
                    .checked_sub(*age)
                    .unwrap_or_else(Instant::now);
                (
                    id.to_string(),
                    Seen {
                        status: status.to_string(),
                        since,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn the_lowest_online_replica_takes_over_orphans_and_long_away_sessions() {
        let after = Duration::from_secs(30);
        let long = Duration::from_secs(60);
        let v = view(&[
            ("b-0", ONLINE, long),
            ("b-1", ONLINE, long),
            ("b-2", ORPHANED, Duration::ZERO),
            ("b-3", AWAY, long),
            ("b-4", AWAY, Duration::from_secs(5)),
            ("b-5", LEAVING, long),
        ]);
        assert_eq!(
            orphans(&v, "b-0", after),
            vec!["b-3"],
            "b-2 announced just now"
        );
        let v = view(&[
            ("b-0", ONLINE, long),
            ("b-2", ORPHANED, Duration::from_secs(6)),
            ("b-3", AWAY, long),
        ]);
        assert_eq!(orphans(&v, "b-0", after), vec!["b-2", "b-3"]);
        assert!(orphans(&v, "b-1", after).is_empty(), "b-0 is lower");
        // Not yet announced online itself: it still counts as a candidate.
        assert_eq!(orphans(&v, "a-9", after), vec!["b-2", "b-3"]);
    }

    #[test]
    fn a_replica_never_takes_over_its_own_session() {
        let v = view(&[("b-0", ORPHANED, Duration::from_secs(60))]);
        assert!(orphans(&v, "b-0", Duration::from_secs(30)).is_empty());
    }
}
