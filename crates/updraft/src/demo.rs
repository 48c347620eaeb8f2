//! `updraft demo`: the newcomer's tour in one command. A server starts on free ports with a
//! temporary data directory; 20 devices are registered; a firmware is uploaded and signed
//! with a signing profile; CreateOTAUpdate rolls it out; the devices — real agents with
//! in-memory flash — download, verify, reboot, self-test and commit while a progress line
//! runs; a table shows where every device ended.
//!
//! It is the fleet simulator's engine ([`crate::simulate`]) with every device well behaved
//! and a narrated front end.

use anyhow::bail;
use clap::Args;
use std::sync::Arc;
use std::time::Duration;

use crate::simulate::{DeviceSettings, ProtocolArg, Rates, Target, plan, provision, run_fleet};

#[derive(Args)]
pub struct DemoArgs {
    /// Devices in the demo fleet.
    #[arg(long, default_value_t = 20)]
    pub devices: usize,
    /// Firmware size in bytes.
    #[arg(long, default_value_t = 256 * 1024)]
    pub size: usize,
    /// How the devices download: MQTT Streams, or HTTP through the pre-signed URL.
    #[arg(long, value_enum, default_value_t = ProtocolArg::Mqtt)]
    pub protocol: ProtocolArg,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.devices == 0 || args.devices > 1000 {
        bail!("--devices must be from 1 to 1000 (use `updraft simulate` for more)");
    }
    crate::simulate::check_fd_limit(args.devices, 4)?;
    println!(
        "Updraft demo: a signed over-the-air update of {} devices\n",
        args.devices
    );
    let step = |n: u32, text: &str| println!("{n}. {text}");
    step(
        1,
        "Starting a server on free ports with a temporary data directory",
    );
    let target = Target::in_process().await?;
    println!("   HTTP API (AWS IoT, S3, ACM, Signer): {}", target.http);
    println!(
        "   MQTT (devices):                      mqtt://{}:{}",
        target.mqtt_host, target.mqtt_port
    );
    let api = Arc::new(target.api);
    step(
        2,
        "Setting up the update through the server's AWS-compatible API",
    );
    let say = |s: &str| println!("   - {s}");
    let fleet = provision(&api, args.devices, args.size, 1, args.protocol, &say).await?;
    let fleet = Arc::new(fleet);
    step(
        3,
        &format!(
            "Running {} devices: download over {}, verify the signature, reboot into v{}, self-test, commit",
            args.devices,
            args.protocol,
            crate::simulate::NEW
        ),
    );
    let blocks = args.size.div_ceil(4096) as u64;
    let roles = plan(args.devices, Rates::default(), blocks, 1);
    let settings = DeviceSettings {
        mqtt_host: target.mqtt_host.clone(),
        mqtt_port: target.mqtt_port,
        block_size: 4096,
        blocks_per_request: 8,
        protocol: args.protocol,
        slow_delay: Duration::ZERO,
        timeout: Duration::from_secs(300),
    };
    let run = run_fleet(&api, fleet.clone(), &roles, settings, false).await?;
    let (results, statuses, summary) = (&run.results, &run.statuses, &run.summary);
    step(
        4,
        &format!("Where every device ended (job {})", fleet.job_id),
    );
    let width = results
        .iter()
        .map(|r| r.thing.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "   {:<width$}  {:<11}  {:<8}  {:>7}",
        "thing", "execution", "version", "time"
    );
    for r in results {
        let status = statuses.get(&r.thing).map_or("?", String::as_str);
        println!(
            "   {:<width$}  {:<11}  {:<8}  {:>6.2}s",
            r.thing,
            status,
            format!("v{}", r.version),
            r.elapsed.as_secs_f64()
        );
    }
    println!();
    summary.print();
    println!(
        "\nNext: `updraft serve` runs a server that stays; `updraft simulate --devices 1000` \
         runs a bigger fleet with failures; see the README."
    );
    let ok = statuses.values().filter(|s| *s == "SUCCEEDED").count();
    if ok != args.devices || !summary.mismatches.is_empty() {
        bail!("{ok} of {} devices succeeded", args.devices);
    }
    Ok(())
}
