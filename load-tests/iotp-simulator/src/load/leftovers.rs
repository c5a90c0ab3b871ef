//! What the bridge left in its MQTT session: after it stopped (it drains, acknowledges and
//! disconnects; its session persists for the next replica with its id), the run connects with
//! the bridge's client id and counts what the broker hands over. Everything was acknowledged,
//! so the count must be 0: anything else is sent again to the next bridge with that id (the
//! slow mode of docs/performance.md, which Mosquitto 2.0.11 caused). The session is then
//! ended (session expiry 0), so nothing outlives the run.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

use crate::stack::BridgeTls;

/// How long the broker may stay silent before the session counts as emptied.
const QUIET: Duration = Duration::from_secs(2);

/// The longest the count may take.
const AT_MOST: Duration = Duration::from_secs(120);

/// PUBLISHes the broker still held for `client_id`'s session on 127.0.0.1:`port` (over TLS
/// with the bridge's identity in a TLS run); the session is ended after.
pub async fn bridge_session_leftovers(
    client_id: &str,
    port: u16,
    tls: Option<BridgeTls>,
) -> anyhow::Result<u64> {
    let mut opts = MqttOptions::new(client_id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(60))
        .set_clean_start(false)
        // Ends the session when this connection closes.
        .set_session_expiry_interval(Some(0))
        .set_max_packet_size(Some(2 * 1024 * 1024));
    if let Some(tls) = tls {
        opts.set_transport(tls.transport()?);
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 1024);
    let started = tokio::time::Instant::now();
    let mut connected = false;
    let mut left = 0u64;
    loop {
        anyhow::ensure!(
            started.elapsed() < AT_MOST,
            "the bridge's session was still handing over messages after {AT_MOST:?} ({left} so far)"
        );
        match tokio::time::timeout(QUIET, eventloop.poll()).await {
            // Silent for QUIET after the CONNACK: nothing more is held.
            Err(_) if connected => break,
            Err(_) => anyhow::bail!("no CONNACK from the broker on :{port} within {QUIET:?}"),
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => connected = true,
            // rumqttc acknowledges it (automatic acks), so the broker moves on to the next.
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) if !p.topic.starts_with(b"$SYS/") => {
                left += 1
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => anyhow::bail!("counting the bridge's session on :{port}: {e}"),
        }
    }
    let _ = client.disconnect().await;
    // Let the DISCONNECT go out.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
    Ok(left)
}
