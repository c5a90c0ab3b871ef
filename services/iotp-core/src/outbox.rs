//! Handing a batch's results on: outputs to Kafka through the [`KafkaSink`], rejections to
//! RabbitMQ as dead letters, each retried with the backoff until confirmed. An output Kafka
//! refuses for good (too large, invalid) is not retried: the input it was made from becomes a
//! dead letter instead, with the refusal's reason code. A dead letter carries its record's
//! `traceparent` as an AMQP header. [`Outbox::deliver`] returns `Ok` only
//! when every one was confirmed, so the caller may then commit the batch.

use std::collections::HashSet;

use tokio_util::sync::CancellationToken;

use crate::dead_letter::{self, DeadLetterPublisher};
use crate::kafka::KafkaSink;
use crate::retry::{Backoff, Halt};
use crate::stage::{Input, Output, Rejection};
use crate::trace;

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

    /// Produce `outputs`, each with the input it was made from (`None` for a tick's), and
    /// dead-letter `rejects`; return once all were confirmed. An input with an output Kafka
    /// refused for good is dead-lettered once, with its original bytes.
    pub async fn deliver(
        &mut self,
        outputs: &[(Option<&Input<'_>>, &Output)],
        rejects: &[(&Input<'_>, &Rejection)],
        shutdown: &CancellationToken,
    ) -> Result<(), Halt> {
        if !outputs.is_empty() {
            let records: Vec<&Output> = outputs.iter().map(|(_, out)| *out).collect();
            let refused = self.sink.send_all(&records, shutdown).await?;
            let mut lettered: HashSet<(&str, i32, i64, Option<u32>)> = HashSet::new();
            for (i, why) in refused {
                let (letter, traceparent) = match outputs[i] {
                    (Some(input), _) => {
                        if !lettered.insert((
                            input.topic,
                            input.partition,
                            input.offset,
                            input.item,
                        )) {
                            continue;
                        }
                        let rejection = Rejection::permanent(why.reason, why.error);
                        let letter = dead_letter::letter(self.stage, input, &rejection);
                        (letter, input.traceparent)
                    }
                    (None, out) => (
                        dead_letter::output_letter(self.stage, out, &why),
                        trace::header(out),
                    ),
                };
                self.dead_letters
                    .deliver(&letter, false, traceparent, &self.backoff, shutdown)
                    .await?;
            }
        }
        for (input, rejection) in rejects {
            let letter = dead_letter::letter(self.stage, input, rejection);
            self.dead_letters
                .deliver(
                    &letter,
                    rejection.transient,
                    input.traceparent,
                    &self.backoff,
                    shutdown,
                )
                .await?;
        }
        Ok(())
    }

    /// Close the dead-letter connection politely.
    pub async fn close(&mut self) {
        self.dead_letters.close().await;
    }
}
