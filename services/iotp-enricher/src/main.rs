use std::process::ExitCode;

fn main() -> ExitCode {
    iotp_core::service::run("enricher", iotp_enricher::run)
}
