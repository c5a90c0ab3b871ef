use std::process::ExitCode;

fn main() -> ExitCode {
    iotp_core::service::run("aggregator", iotp_aggregator::run)
}
