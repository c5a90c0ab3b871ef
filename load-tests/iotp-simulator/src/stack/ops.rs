//! What a chaos run does to the running stack: scale a service, `kill -9` a replica or Tansu,
//! restart the run's own RabbitMQ or Mosquitto, and start again replicas that exit on their
//! own.

use std::time::Duration;

use anyhow::Context as _;
use rand::Rng;

use super::replica::Replica;
use super::{lock, process, tansu_member, Crash, Stack, EXIT_WITHIN, SERVICES};

impl Stack {
    /// Scale `service` to `n` replicas: start the missing ones (lowest free indices) and wait
    /// until they are ready, or stop the surplus gracefully (SIGTERM, highest index first, one
    /// after the other). What happened, for the report, and how long it took.
    pub async fn scale(&self, service: &str, n: usize) -> anyhow::Result<(String, Duration)> {
        let service = SERVICES
            .into_iter()
            .find(|s| *s == service)
            .with_context(|| format!("`{service}` is not a service"))?;
        let started = std::time::Instant::now();
        let mut indices: Vec<usize> = self.indices(service).await;
        let mut said = Vec::new();
        if indices.len() < n {
            let missing: Vec<usize> = (0..)
                .filter(|i| !indices.contains(i))
                .take(n - indices.len())
                .collect();
            // Start them all, then wait for each: they join their group together.
            let mut spawned = Vec::new();
            for index in missing {
                spawned.push(self.spawn_replica(service, index).await?);
                indices.push(index);
            }
            for (name, port) in spawned {
                self.ready(&name, port).await?;
                said.push(format!(
                    "{name} ready after {:.1} s",
                    started.elapsed().as_secs_f64()
                ));
            }
        }
        while indices.len() > n {
            indices.sort_unstable();
            let Some(index) = indices.pop() else { break };
            let r = {
                let mut replicas = self.replicas.lock().await;
                let i = replicas
                    .iter()
                    .position(|r| r.service == service && r.index == index);
                i.map(|i| replicas.remove(i))
            };
            if let Some(r) = r {
                let name = r.name();
                let code = self.stop_replica(r, "TERM").await;
                said.push(format!(
                    "{name} exit {}",
                    code.map_or("by signal".into(), |c| c.to_string())
                ));
            }
        }
        Ok((said.join(", "), started.elapsed()))
    }

    /// The indices of `service`'s live replicas.
    async fn indices(&self, service: &str) -> Vec<usize> {
        self.replicas
            .lock()
            .await
            .iter()
            .filter(|r| r.service == service)
            .map(|r| r.index)
            .collect()
    }

    /// In a chaos run, start every replica that exited on its own again, with its name (as a
    /// StatefulSet would), without waiting for it to be ready; nothing otherwise (a calm run
    /// reports the exit code at the end).
    pub async fn restart_crashed(&self) {
        if !self.supervise {
            return;
        }
        let gone: Vec<Replica> = {
            let mut replicas = self.replicas.lock().await;
            let (gone, live) = std::mem::take(&mut *replicas)
                .into_iter()
                .partition(|r| process::exited(r.pid));
            *replicas = live;
            gone
        };
        for mut r in gone {
            let (status, cpu) = process::reap(&mut r.child, r.pid, EXIT_WITHIN).await;
            lock(&self.roster).remove(r.pid, cpu);
            let crash = Crash {
                replica: r.name(),
                at: crate::fleet::now_millis(),
                code: status.and_then(|s| s.code()),
            };
            eprintln!(
                "iotp-load: {} exited on its own ({}); starting it again",
                crash.replica,
                crash
                    .code
                    .map_or("by signal".into(), |c| format!("exit {c}"))
            );
            lock(&self.crashes).push(crash);
            if let Err(e) = self.spawn_replica(r.service, r.index).await {
                eprintln!("iotp-load: cannot start {} again: {e:#}", r.name());
            }
        }
    }

    /// The replicas that exited on their own and were started again.
    pub fn crashes(&self) -> Vec<Crash> {
        lock(&self.crashes).clone()
    }

    /// `kill -9` a random replica of `service` and start it again with the same name (and
    /// port); which one, and how long it took until it was ready again.
    pub async fn kill_replica(&self, service: &str) -> anyhow::Result<(String, Duration)> {
        let started = std::time::Instant::now();
        let r = {
            let mut replicas = self.replicas.lock().await;
            let of: Vec<usize> = (0..replicas.len())
                .filter(|i| replicas[*i].service == service)
                .collect();
            anyhow::ensure!(!of.is_empty(), "no replica of {service} to kill");
            let pick = of[lock(&self.rng).gen_range(0..of.len())];
            replicas.remove(pick)
        };
        let (service, index) = (r.service, r.index);
        self.stop_replica(r, "KILL").await;
        let (name, port) = self.spawn_replica(service, index).await?;
        self.ready(&name, port).await?;
        Ok((name, started.elapsed()))
    }

    /// `kill -9` Tansu and start it again on the same port and storage; how long until it
    /// listened again.
    pub async fn kill_tansu(&self) -> anyhow::Result<Duration> {
        let mut guard = self.tansu.lock().await;
        let tansu = guard
            .as_mut()
            .context("the run uses a broker it did not start")?;
        let started = std::time::Instant::now();
        let cpu = tansu.stop("KILL", Duration::from_secs(10)).await;
        lock(&self.roster).remove(tansu.pid, cpu);
        tansu.start_again().await?;
        lock(&self.roster).add(tansu_member(tansu.pid));
        Ok(started.elapsed())
    }

    /// Stop and start the run's RabbitMQ node's application; how long until it listened again.
    pub async fn restart_rabbitmq(&self) -> anyhow::Result<Duration> {
        self.rabbitmq
            .as_ref()
            .context("the run has no RabbitMQ node of its own")?
            .restart_app()
            .await
    }

    /// SIGTERM the run's Mosquitto (it saves sessions and queues) and start it again with the
    /// same config; how long until it listened again.
    pub async fn restart_mosquitto(&self) -> anyhow::Result<Duration> {
        let mut guard = self.mosquitto.lock().await;
        let m = guard
            .as_mut()
            .context("the run has no Mosquitto of its own")?;
        let started = std::time::Instant::now();
        m.stop("TERM", Duration::from_secs(30)).await;
        m.start_again().await?;
        Ok(started.elapsed())
    }
}
