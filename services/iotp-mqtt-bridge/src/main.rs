use std::process::ExitCode;

fn main() -> ExitCode {
    iotp_core::service::run("mqtt-bridge", iotp_mqtt_bridge::run)
}
