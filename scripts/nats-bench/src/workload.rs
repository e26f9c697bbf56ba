//! The two runs: throughput (publish pipelined, consume and ack all) and
//! latency at a fixed rate.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use async_nats::Client;
use async_nats::jetstream::Context;
use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::stream::{self, StorageType};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::task::JoinSet;

use crate::Opts;

/// Connect, retrying for 10 s while the server starts.
pub async fn connect(url: &str) -> Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match async_nats::connect(url).await {
            Ok(c) => return Ok(c),
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("cannot connect to NATS at {url}")),
        }
    }
}

/// A fresh stream `name` on `subject` (file storage, one replica) and a
/// durable pull consumer with explicit acks on it.
async fn fresh(js: &Context, o: &Opts, name: &str, subject: &str) -> Result<PullConsumer> {
    // Left over from an earlier run against the same server: start clean.
    let _ = js.delete_stream(name).await;
    let stream = js
        .create_stream(stream::Config {
            name: name.into(),
            subjects: vec![subject.into()],
            storage: StorageType::File,
            num_replicas: 1,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating stream {name} (is JetStream enabled?)"))?;
    stream
        .create_consumer(pull::Config {
            durable_name: Some(format!("{name}-consumer")),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: o.max_ack_pending,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating the durable pull consumer on {name}"))
}

/// Pull until `n` distinct stream sequences (1..=n) have been received and
/// acked; `on_msg` sees each new payload. Returns the redelivery count.
async fn consume(
    consumer: PullConsumer,
    n: usize,
    batch: usize,
    mut on_msg: impl FnMut(&[u8]),
) -> Result<u64> {
    let mut msgs = consumer
        .stream()
        .max_messages_per_batch(batch)
        .messages()
        .await
        .context("starting the pull consumer")?;
    let mut seen = vec![false; n];
    let (mut unique, mut redelivered) = (0usize, 0u64);
    while unique < n {
        let m = msgs
            .next()
            .await
            .ok_or_else(|| anyhow!("the consumer's message stream ended"))?
            .context("pulling messages")?;
        let seq = m
            .info()
            .map_err(|e| anyhow!("message info: {e}"))?
            .stream_sequence;
        let slot = seq
            .checked_sub(1)
            .and_then(|i| seen.get_mut(i as usize))
            .ok_or_else(|| anyhow!("unexpected stream sequence {seq} (expected 1..={n})"))?;
        if *slot {
            redelivered += 1;
        } else {
            *slot = true;
            unique += 1;
            on_msg(&m.payload);
        }
        m.ack().await.map_err(|e| anyhow!("ack: {e}"))?;
    }
    Ok(redelivered)
}

/// Wait until the server's view of the consumer has every message acked.
async fn acks_confirmed(client: &Client, consumer: &PullConsumer, n: usize) -> Result<()> {
    client.flush().await.context("flushing acks")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = consumer.get_info().await.context("consumer info")?;
        if info.ack_floor.stream_sequence >= n as u64 && info.num_ack_pending == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the server shows ack floor {} of {n} and {} acks pending after 60 s",
                info.ack_floor.stream_sequence,
                info.num_ack_pending
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// What the throughput run measured.
pub struct Throughput {
    /// Until every publish ack was back.
    pub published: Duration,
    /// Until the server confirmed every message acked by the consumer.
    pub acked: Duration,
    /// Publish call → its ack, per message, sorted.
    pub publish_lat: Vec<Duration>,
    /// Messages delivered more than once.
    pub redelivered: u64,
}

/// N messages published with `inflight` acks outstanding while the
/// consumer pulls and acks them.
pub async fn throughput(o: &Opts, client: &Client, js: &Context) -> Result<Throughput> {
    let consumer = fresh(js, o, "BENCH_TP", "bench.tp").await?;
    let n = o.messages;
    let start = Instant::now();
    let (c, batch) = (consumer.clone(), o.batch);
    let consuming = tokio::spawn(async move { consume(c, n, batch, |_| ()).await });
    let payload = Bytes::from(vec![b'x'; o.size]);
    let mut acks = FuturesUnordered::new();
    let mut publish_lat = Vec::with_capacity(n);
    for _ in 0..n {
        while acks.len() >= o.inflight {
            if let Some(r) = acks.next().await {
                publish_lat.push(r?);
            }
        }
        let t = Instant::now();
        let ack = js
            .publish("bench.tp", payload.clone())
            .await
            .context("publish")?;
        acks.push(async move {
            ack.await
                .map(|_| t.elapsed())
                .context("waiting for a publish ack")
        });
    }
    while let Some(r) = acks.next().await {
        publish_lat.push(r?);
    }
    let published = start.elapsed();
    let redelivered = tokio::time::timeout(Duration::from_secs(300), consuming)
        .await
        .context("the consumer did not receive every message within 300 s")?
        .context("consumer task")??;
    acks_confirmed(client, &consumer, n).await?;
    let acked = start.elapsed();
    publish_lat.sort();
    let _ = js.delete_stream("BENCH_TP").await;
    Ok(Throughput {
        published,
        acked,
        publish_lat,
        redelivered,
    })
}

/// What the latency run measured.
pub struct Latency {
    /// publish() → the consumer holds the message, sorted.
    pub samples: Vec<Duration>,
    /// How long offering all messages took.
    pub offered: Duration,
}

/// `rate` msg/s for `rate_secs`; each payload carries its send time.
pub async fn latency(o: &Opts, client: &Client, js: &Context) -> Result<Latency> {
    let consumer = fresh(js, o, "BENCH_LAT", "bench.lat").await?;
    let n = (o.rate * o.rate_secs) as usize;
    let base = Instant::now();
    let (c, batch) = (consumer.clone(), o.batch);
    let consuming = tokio::spawn(async move {
        let mut samples = Vec::with_capacity(n);
        consume(c, n, batch, |p| {
            let now = base.elapsed();
            let sent = p
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .unwrap_or(0);
            samples.push(now.saturating_sub(Duration::from_nanos(sent)));
        })
        .await?;
        Ok::<_, anyhow::Error>(samples)
    });
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / o.rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = JoinSet::new();
    let start = Instant::now();
    for _ in 0..n {
        tick.tick().await;
        let mut payload = vec![b'x'; o.size];
        let sent = base.elapsed().as_nanos() as u64;
        payload[..8].copy_from_slice(&sent.to_le_bytes());
        let js = js.clone();
        tasks.spawn(async move {
            js.publish("bench.lat", Bytes::from(payload))
                .await
                .context("publish")?
                .await
                .context("waiting for a publish ack")?;
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.context("publish task")??;
    }
    let offered = start.elapsed();
    let mut samples = tokio::time::timeout(Duration::from_secs(60), consuming)
        .await
        .context("the latency run did not drain within 60 s")?
        .context("consumer task")??;
    acks_confirmed(client, &consumer, n).await?;
    samples.sort();
    let _ = js.delete_stream("BENCH_LAT").await;
    Ok(Latency { samples, offered })
}
