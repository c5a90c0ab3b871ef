use std::process::ExitCode;

fn main() -> ExitCode {
    iotp_core::service::run("upserter", iotp_upserter::run)
}
