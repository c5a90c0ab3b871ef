//! Phase 5: the report written (`report.md`, `report.json`, the plots) as soon as the audit is
//! done, then the forward-only ceiling measured on the same brokers and the report written
//! again with it; the broker stopped last.

use std::time::Duration;

use super::Run;
use crate::ceiling;
use crate::report::{Outcome, Report, Setting};

/// Forward-only hops of the ceiling run: as many consuming hops as the pipeline has.
const CEILING_HOPS: usize = 3;

/// How long the ceiling run may take to carry the run's records.
const CEILING_WITHIN: Duration = Duration::from_secs(300);

/// Write the report of `outcome`, measure the ceiling if the scenario asks for it, stop the
/// broker; the report (`passed` says whether the run passed).
pub async fn report(run: Run, outcome: Outcome) -> anyhow::Result<Report> {
    let setting = Setting {
        scenario: run.scenario.clone(),
        tenant: run.tenant.clone(),
        started: run.started.clone(),
        kafka: run.opts.broker(),
    };
    // The audit's report first: the ceiling runs after, on the same broker, and may fail.
    let mut report = Report::build(setting, outcome);
    report.write(&run.out)?;
    if run.scenario.ceiling && !run.opts.no_ceiling {
        println!("iotp-load: measuring the forward-only ceiling on the same brokers");
        let mut c = ceiling::measure(
            &run.kafka,
            CEILING_HOPS,
            run.opts.partitions,
            CEILING_WITHIN,
        )
        .await?;
        let (rate, cost) = ceiling::mqtt_rate(run.target("ceiling"), &run.scenario).await?;
        c.mqtt_rate = Some(rate);
        c.mqtt_machine = Some(cost);
        report.set_ceiling(c);
        report.write(&run.out)?;
    }
    run.stack.stop_brokers().await;
    println!("\n{}", report.markdown());
    println!(
        "iotp-load: report in {}",
        run.out.join("report.md").display()
    );
    Ok(report)
}
