//! Bridge replicas come and go without stranding a message, against the project's Mosquitto
//! (which keeps queueing a shared subscription's share for a member that went away): replicas
//! stopped while another is online leave the group and end their sessions; a crashed
//! replica's session is drained by a survivor once the broker announces it orphaned.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use iotp_core::probe::{find_sum, sample_sum};
use support::*;

const DEVICES: usize = 100;
const PER_DEVICE: i64 = 300;

/// The shared setup with a four-partition topic and `env` for the bridges.
async fn setup_with(name: &str, env: &[(&str, &str)]) -> Setup {
    let mut s = setup(name, 4).await;
    s.spec.env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    s
}

/// Wait until the bridges together acknowledged `n` messages.
async fn acked_at_least(bridges: &[&Bridge], n: f64) -> f64 {
    for _ in 0..400 {
        let acked: f64 = bridges
            .iter()
            .map(|b| sample_sum(&b.metrics(), "iotp_mqtt_acked_messages_total", &[]))
            .sum();
        if acked >= n {
            return acked;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the bridges did not acknowledge {n} messages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scale_in_three_to_one_strands_nothing() {
    let s = setup_with("scale-in", &[("IOTP__MQTT__DRAIN_QUIET", "500ms")]).await;
    let names = ["bridge-in-0", "bridge-in-1", "bridge-in-2"];
    let mut bridges: Vec<Bridge> = names.iter().map(|n| Bridge::start(&s.spec, n)).collect();
    for b in &bridges {
        b.wait_ready();
    }
    // Presence is announced right after connecting; give the replicas a moment to see it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (port, tenant) = (s.mosquitto.port, s.tenant.clone());
    let fleet =
        tokio::spawn(async move { publish_fleet(port, &tenant, DEVICES, PER_DEVICE).await });
    let at_stop = acked_at_least(&bridges.iter().collect::<Vec<_>>(), 3000.0).await;

    // Scale in mid-stream: replicas 2 and 1 stop together, as a StatefulSet scaled to 1 does.
    let mut two = bridges.pop().unwrap();
    let mut one = bridges.pop().unwrap();
    let stops = [
        std::thread::spawn(move || two.terminate()),
        std::thread::spawn(move || one.terminate()),
    ];
    for stop in stops {
        assert_eq!(stop.join().unwrap(), 0, "SIGTERM leaves and exits 0");
    }
    let sent = fleet.await.unwrap();
    assert_eq!(sent.total(), DEVICES * PER_DEVICE as usize);
    assert!(
        at_stop < sent.total() as f64,
        "stopped mid-stream ({at_stop} of {} acknowledged)",
        sent.total()
    );
    let seen = read_until_complete(&s.spec.topic, &sent, Duration::from_secs(60)).await;
    assert_none_missing(&sent, &seen);

    let mut survivor = bridges.pop().unwrap();
    assert_eq!(survivor.terminate(), 0);
    for gone in &names[1..] {
        let (present, held) = session_holds(s.mosquitto.port, gone, Duration::from_secs(1)).await;
        assert!(
            !present,
            "{gone}'s session was ended ({held} messages held)"
        );
    }
    let (present, held) = session_holds(s.mosquitto.port, names[0], Duration::from_secs(2)).await;
    assert!(present, "the last replica keeps its session");
    assert_eq!(held, 0, "the last replica's session holds nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crashed_replica_session_is_drained_by_a_survivor() {
    let s = setup_with(
        "crash-takeover",
        &[
            ("IOTP__MQTT__ORPHAN_AFTER", "2s"),
            ("IOTP__MQTT__DRAIN_QUIET", "500ms"),
        ],
    )
    .await;
    let mut survivor = Bridge::start(&s.spec, "bridge-crash-0");
    let mut crashed = Bridge::start(&s.spec, "bridge-crash-1");
    survivor.wait_ready();
    crashed.wait_ready();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (port, tenant) = (s.mosquitto.port, s.tenant.clone());
    let fleet =
        tokio::spawn(async move { publish_fleet(port, &tenant, DEVICES, PER_DEVICE).await });
    acked_at_least(&[&survivor, &crashed], 3000.0).await;
    crashed.kill();

    // The broker keeps queueing the crashed replica's share in its session; after 2 s it
    // publishes the session's will and the survivor drains it.
    let sent = fleet.await.unwrap();
    assert_eq!(sent.total(), DEVICES * PER_DEVICE as usize);
    let seen = read_until_complete(&s.spec.topic, &sent, Duration::from_secs(60)).await;
    assert_none_missing(&sent, &seen);
    assert!(
        seen.iter()
            .any(|r| r.envelope.bridge_id == "bridge-crash-1"),
        "the crashed replica had a share before it died"
    );
    // The drained messages reach Kafka before the drain is over (quiet, then the session
    // ends, then it is counted).
    let mut taken_over = None;
    for _ in 0..150 {
        taken_over = find_sum(
            &survivor.metrics(),
            "iotp_mqtt_sessions_ended_total",
            &["outcome=\"taken_over\""],
        );
        if taken_over.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(taken_over, Some(1.0), "the survivor drained one orphan");

    assert_eq!(survivor.terminate(), 0);
    let (present, held) =
        session_holds(s.mosquitto.port, "bridge-crash-1", Duration::from_secs(1)).await;
    assert!(
        !present,
        "the crashed replica's session was ended ({held} held)"
    );
    let (_, held) = session_holds(s.mosquitto.port, "bridge-crash-0", Duration::from_secs(2)).await;
    assert_eq!(held, 0, "the survivor's session holds nothing");
}
