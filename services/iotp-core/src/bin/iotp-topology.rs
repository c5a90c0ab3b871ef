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
        #[command(flatten)]
        security: KafkaSecurity,
        /// Topic replication factor.
        #[arg(long, default_value_t = 1)]
        replication: i32,
        /// Create every topic with this many partitions instead of the topology's (a small
        /// deployment: as many as the replicas a stage will run; a group never uses more).
        /// Topics that exist keep theirs.
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
        partitions: Option<i32>,
        /// RabbitMQ URI.
        #[arg(
            long,
            env = "IOTP_AMQP_URI",
            // `--help` would print the variable's value, password and all.
            hide_env_values = true,
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
    /// Print how many records a topic carries, a bundle's items one by one (the topic read
    /// from its beginning to its end); `--kafka-records`: how many Kafka records it holds
    /// (the sum of its partitions' ends).
    Count {
        /// Topic.
        topic: String,
        /// Kafka bootstrap servers.
        #[arg(long, env = "IOTP__KAFKA__BROKERS", default_value = "127.0.0.1:9092")]
        brokers: String,
        /// Count Kafka records (a bundle as one).
        #[arg(long)]
        kafka_records: bool,
        #[command(flatten)]
        security: KafkaSecurity,
    },
}

/// Kafka TLS and SASL, read from the services' variables (`kafka.*` in their configuration).
#[derive(clap::Args)]
struct KafkaSecurity {
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    #[arg(
        long,
        env = "IOTP__KAFKA__SECURITY_PROTOCOL",
        default_value = "plaintext"
    )]
    kafka_security_protocol: String,
    /// CA certificates (PEM) for the brokers' certificates.
    #[arg(long, env = "IOTP__KAFKA__SSL_CA_LOCATION")]
    kafka_ssl_ca_location: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long, env = "IOTP__KAFKA__SSL_CERTIFICATE_LOCATION")]
    kafka_ssl_certificate_location: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, env = "IOTP__KAFKA__SSL_KEY_LOCATION")]
    kafka_ssl_key_location: Option<PathBuf>,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    #[arg(long, env = "IOTP__KAFKA__SASL_MECHANISM")]
    kafka_sasl_mechanism: Option<String>,
    /// SASL user name.
    #[arg(long, env = "IOTP__KAFKA__SASL_USERNAME")]
    kafka_sasl_username: Option<String>,
    /// File holding the SASL password.
    #[arg(long, env = "IOTP__KAFKA__SASL_PASSWORD_FILE")]
    kafka_sasl_password_file: Option<PathBuf>,
}

impl KafkaSecurity {
    /// The Kafka settings for `brokers`, checked as a service checks them.
    fn config(self, brokers: String) -> anyhow::Result<KafkaConfig> {
        let kafka = KafkaConfig {
            brokers,
            security_protocol: self.kafka_security_protocol,
            ssl_ca_location: self.kafka_ssl_ca_location,
            ssl_certificate_location: self.kafka_ssl_certificate_location,
            ssl_key_location: self.kafka_ssl_key_location,
            sasl_mechanism: self.kafka_sasl_mechanism,
            sasl_username: self.kafka_sasl_username,
            sasl_password_file: self.kafka_sasl_password_file,
            ..KafkaConfig::default()
        };
        let problems = kafka.problems();
        if !problems.is_empty() {
            anyhow::bail!("{}", problems.join("; "));
        }
        Ok(kafka)
    }
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
        Command::Count {
            topic,
            brokers,
            kafka_records,
            security,
        } => {
            let kafka = security.config(brokers)?;
            let count = if kafka_records {
                iotp_core::kafka::count_records(&kafka, &topic).await?
            } else {
                iotp_core::kafka::count_carried(&kafka, &topic).await?
            };
            println!("{count}");
        }
        Command::Apply {
            brokers,
            security,
            replication,
            partitions,
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
            let kafka = security.config(brokers)?;
            let admin = kafka.admin("iotp-topology")?;
            let mut topics = topology().kafka.topics.clone();
            if let Some(n) = partitions {
                for t in &mut topics {
                    t.partitions = n;
                }
            }
            let created = ensure_topics(&admin, &topics, replication).await?;
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
