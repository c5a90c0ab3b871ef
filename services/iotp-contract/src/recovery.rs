//! The error model every layer shares. A failure says what should become of the work in hand;
//! only the runtime acts on it. Bad input is not an error here: a stage turns it into a
//! rejection (a dead letter with a reason code) and goes on.

/// What the runtime does after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// A dependency failed for now (connection lost, timeout, busy database, write conflict):
    /// the runtime tries the same work again with its one backoff policy and acknowledges
    /// nothing upstream meanwhile. Work that may be retried must be idempotent.
    Retry,
    /// Trying again cannot help (a defect, a schema the store cannot take): the service stops
    /// without committing, and the work is consumed again after a restart.
    Stop,
}

/// An error that knows its [`Recovery`]: the stage runtime converts any such error returned
/// by a stage with `?`.
pub trait Classify {
    /// What to do about this failure.
    fn recovery(&self) -> Recovery;
}

impl Classify for crate::CodecError {
    /// Decoding failures are rejections the stage makes itself; one that reaches the runtime
    /// is an encode of our own record that does not fit its schema: a defect.
    fn recovery(&self) -> Recovery {
        Recovery::Stop
    }
}
