use std::process::ExitCode;

fn main() -> ExitCode {
    iotp_core::service::run("dlq-handler", iotp_dlq_handler::run)
}
