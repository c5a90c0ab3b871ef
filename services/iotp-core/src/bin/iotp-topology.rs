//! Creates the pipeline's Kafka topics and RabbitMQ topology from `schemas/topology.toml`;
//! prints it; safe to run again.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use iotp_contract::topology::topology;
use iotp_core::kafka::{ensure_topics, KafkaConfig};

#[derive(Parser)]
#[command(about = "Apply or print the pipeline topology (schemas/topology.toml)")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create missing Kafka topics and declare the RabbitMQ exchanges and queues.
    Apply {
        /// Kafka bootstrap servers.
        #[arg(long, env = "IOTP__KAFKA__BROKERS", default_value = "127.0.0.1:9092")]
        brokers: String,
        /// Topic replication factor.
        #[arg(long, default_value_t = 1)]
        replication: i32,
        /// RabbitMQ URI.
        #[arg(
            long,
            env = "IOTP_AMQP_URI",
            default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
        )]
        amqp: String,
        /// Skip RabbitMQ.
        #[arg(long)]
        kafka_only: bool,
    },
    /// Print topics as `name partitions`.
    Topics,
    /// Print how many records a topic holds (sum of its partitions' high watermarks).
    Count {
        /// Topic.
        topic: String,
        /// Kafka bootstrap servers.
        #[arg(long, env = "IOTP__KAFKA__BROKERS", default_value = "127.0.0.1:9092")]
        brokers: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iotp-topology: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Topics => {
            for t in &topology().kafka.topics {
                println!("{} {}", t.name, t.partitions);
            }
        }
        Command::Count { topic, brokers } => {
            let kafka = KafkaConfig {
                brokers,
                ..KafkaConfig::default()
            };
            println!("{}", iotp_core::kafka::count_records(&kafka, &topic).await?);
        }
        Command::Apply {
            brokers,
            replication,
            amqp,
            kafka_only,
        } => {
            let kafka = KafkaConfig {
                brokers,
                ..KafkaConfig::default()
            };
            let admin = kafka.admin("iotp-topology")?;
            let created = ensure_topics(&admin, &topology().kafka.topics, replication).await?;
            println!(
                "kafka: {} topics, created {:?}",
                topology().kafka.topics.len(),
                created
            );
            if !kafka_only {
                let connection = iotp_core::amqp::connect(&amqp).await?;
                let channel = connection.create_channel().await?;
                let queues =
                    iotp_core::amqp::declare_topology(&channel, &topology().rabbitmq).await?;
                println!("rabbitmq: declared {}", queues.join(", "));
                connection.close(200, "done".into()).await?;
            }
        }
    }
    Ok(())
}
