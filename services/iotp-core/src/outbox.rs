//! Handing a batch's results on: outputs to Kafka through the [`KafkaSink`], rejections to
//! RabbitMQ as dead letters, each retried with the backoff until confirmed. [`Outbox::deliver`]
//! returns `Ok` only when every one was confirmed, so the caller may then commit the batch.

use iotp_contract::{Classify, Recovery};
use tokio_util::sync::CancellationToken;

use crate::dead_letter::{self, DeadLetterPublisher};
use crate::kafka::KafkaSink;
use crate::metrics::metrics;
use crate::retry::{Backoff, Halt};
use crate::stage::{Input, Output, Rejection};

/// Where a stage's results go.
pub struct Outbox {
    stage: &'static str,
    sink: KafkaSink,
    dead_letters: DeadLetterPublisher,
    backoff: Backoff,
}

impl Outbox {
    /// Results of `stage`, to `sink` and `dead_letters`.
    pub fn new(
        stage: &'static str,
        sink: KafkaSink,
        dead_letters: DeadLetterPublisher,
        backoff: Backoff,
    ) -> Self {
        Self {
            stage,
            sink,
            dead_letters,
            backoff,
        }
    }

    /// Produce `outputs` and dead-letter `rejects`; return once all were confirmed.
    pub async fn deliver(
        &mut self,
        outputs: &[&Output],
        rejects: &[(&Input<'_>, &Rejection)],
        shutdown: &CancellationToken,
    ) -> Result<(), Halt> {
        if !outputs.is_empty() {
            self.sink.send_all(outputs, shutdown).await?;
        }
        for (input, rejection) in rejects {
            self.dead_letter(input, rejection, shutdown).await?;
        }
        Ok(())
    }

    async fn dead_letter(
        &mut self,
        input: &Input<'_>,
        rejection: &Rejection,
        shutdown: &CancellationToken,
    ) -> Result<(), Halt> {
        let letter = dead_letter::letter(self.stage, input, rejection);
        let mut retrying = self.backoff.start();
        loop {
            match self
                .dead_letters
                .publish(&letter, rejection.transient)
                .await
            {
                Ok(()) => {
                    metrics()
                        .dead_letters_total
                        .with_label_values(&[self.stage, rejection.reason])
                        .inc();
                    return Ok(());
                }
                Err(e) if e.recovery() == Recovery::Stop => return Err(Halt::Failed(e.into())),
                Err(e) => {
                    tracing::warn!(error = %e, reason = rejection.reason, "dead letter not confirmed; retrying");
                    retrying.wait(shutdown, &e).await?;
                }
            }
        }
    }

    /// Close the dead-letter connection politely.
    pub async fn close(&mut self) {
        self.dead_letters.close().await;
    }
}
