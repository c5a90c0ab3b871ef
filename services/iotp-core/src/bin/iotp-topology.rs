//! Creates the pipeline's Kafka topics and RabbitMQ topology from `schemas/topology.toml`;
//! prints it; safe to run again.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use iotp_contract::topology::topology;
use iotp_core::amqp::AmqpTls;
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
        /// CA certificates (PEM) for an `amqps://` URI, added to the system's.
        #[arg(long, env = "IOTP_AMQP_CA_FILE")]
        amqp_ca_file: Option<PathBuf>,
        /// Client certificate (PEM) for an `amqps://` URI.
        #[arg(long, env = "IOTP_AMQP_CERT_FILE", requires = "amqp_key_file")]
        amqp_cert_file: Option<PathBuf>,
        /// The client certificate's private key (PEM).
        #[arg(long, env = "IOTP_AMQP_KEY_FILE", requires = "amqp_cert_file")]
        amqp_key_file: Option<PathBuf>,
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
            amqp_ca_file,
            amqp_cert_file,
            amqp_key_file,
            kafka_only,
        } => {
            let tls = AmqpTls {
                ca_file: amqp_ca_file,
                cert_file: amqp_cert_file,
                key_file: amqp_key_file,
            };
            let problems = tls.problems("--amqp-*-file", &amqp);
            if !problems.is_empty() {
                anyhow::bail!("{}", problems.join("; "));
            }
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
                let connection = iotp_core::amqp::connect_with(&amqp, &tls).await?;
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
