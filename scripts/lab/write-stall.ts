/**
 * The freeze window as an application sees it (issue 10's benchmark, run
 * inside a user-mode-linux guest by `scripts/bench-lvm.ts --only stall`):
 * a writer process does one small O_DSYNC write every ~10 ms on the origin's
 * filesystem and records when each write began and ended, while the real
 * LVM provider (compiled, dist/) takes and removes snapshots of it. A job's
 * stall is the longest write that overlapped its `create` call — the time a
 * committing application was really held — next to the provider's own
 * `freezeSeconds` (the wall time around the LVM commands). The same measure
 * over windows of the same length with no snapshot gives the guest's own
 * jitter (one ptrace'd CPU), so the two can be told apart.
 *
 *   node dist/scripts/lab/write-stall.js writer FILE OUT
 *   node dist/scripts/lab/write-stall.js bench --jobs N VOLUME-JSON...
 *     (VOLUME-JSON: {"mode":"thin"|"classic","name","device","mountpoint"}; prints one JSON line per volume)
 */
import { spawn } from 'node:child_process';
import { constants } from 'node:fs';
import { open, readFile, rm } from 'node:fs/promises';
import { pathToFileURL } from 'node:url';
import { pino } from 'pino';
import { LvmSnapshotProvider, type LvmSnapshotMode } from '../../agent/snapshot/lvm/lvm-snapshot-provider.js';

const now = () => performance.timeOrigin + performance.now(); // epoch ms, comparable across processes

/** Writes 4 KiB with O_DSYNC every `periodMs` until SIGTERM, then dumps "start end" pairs (epoch ms) to `out`. */
export async function writer(file: string, out: string, periodMs = 10): Promise<void> {
  const fh = await open(file, constants.O_WRONLY | constants.O_CREAT | constants.O_DSYNC, 0o600);
  const buf = Buffer.alloc(4096);
  const log: number[] = [];
  let stop = false;
  process.on('SIGTERM', () => (stop = true));
  for (let i = 0; !stop; i++) {
    const t0 = now();
    buf.writeDoubleLE(t0, 0);
    await fh.write(buf, 0, buf.length, (i % 256) * 4096);
    const t1 = now();
    log.push(t0, t1);
    const wait = periodMs - (now() - t0);
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  }
  await fh.close();
  const lines: string[] = [];
  for (let i = 0; i < log.length; i += 2) lines.push(`${log[i]!.toFixed(3)} ${log[i + 1]!.toFixed(3)}`);
  const o = await open(out, 'w');
  await o.writeFile(lines.join('\n') + '\n');
  await o.sync();
  await o.close();
}

/** The longest write that overlapped [t0, t1] (ms); 0 if none did. */
export function longestWrite(writes: Array<[number, number]>, t0: number, t1: number): number {
  let worst = 0;
  for (const [s, e] of writes) if (s <= t1 && e >= t0) worst = Math.max(worst, e - s);
  return worst;
}

interface BenchVolume { mode: LvmSnapshotMode; name: string; device: string; mountpoint: string }

async function bench(jobs: number, vols: BenchVolume[]): Promise<void> {
  const self = new URL(import.meta.url).pathname;
  for (const v of vols) {
    const provider = new LvmSnapshotProvider({ mode: v.mode, agent: 'stall', stateDir: `/tmp/stall-state-${v.name}`, pollMs: 600_000, logger: pino({ level: 'silent' }) });
    const out = `/tmp/stall-${v.name}.log`;
    const child = spawn(process.execPath, [self, 'writer', `${v.mountpoint}/stall.dat`, out], { stdio: 'inherit' });
    const exited = new Promise<void>((r) => child.on('exit', () => r()));
    const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
    await sleep(1500);
    const windows: Array<{ t0: number; t1: number; freeze: number; idle: [number, number] }> = [];
    try {
      for (let j = 0; j < jobs; j++) {
        const t0 = now();
        const s = await provider.create({ name: v.name, device: v.device, mountpoint: v.mountpoint, chunkSize: 65536 }, `s${j}`);
        const t1 = now();
        await provider.remove(s);
        await sleep(500);
        // A window of the same length with no snapshot: the guest's own jitter.
        const i0 = now();
        await sleep(t1 - t0);
        windows.push({ t0, t1, freeze: s.freezeSeconds, idle: [i0, now()] });
      }
    } finally {
      child.kill('SIGTERM');
      await exited;
    }
    const writes = (await readFile(out, 'utf8')).trim().split('\n').map((l) => l.split(' ').map(Number) as [number, number]);
    await rm(out, { force: true });
    console.log(JSON.stringify({
      volume: v.name, mode: v.mode, writes: writes.length,
      stallMs: windows.map((w) => +longestWrite(writes, w.t0, w.t1).toFixed(1)),
      idleStallMs: windows.map((w) => +longestWrite(writes, w.idle[0], w.idle[1]).toFixed(1)),
      createMs: windows.map((w) => +(w.t1 - w.t0).toFixed(0)),
      freezeMs: windows.map((w) => +(w.freeze * 1000).toFixed(0)),
    }));
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const [cmd, ...rest] = process.argv.slice(2);
  if (cmd === 'writer') await writer(rest[0]!, rest[1]!);
  else if (cmd === 'bench') {
    const jobs = Number(rest[rest.indexOf('--jobs') + 1] ?? 10);
    await bench(jobs, rest.filter((a) => a.startsWith('{')).map((a) => JSON.parse(a) as BenchVolume));
  } else {
    console.error('usage: write-stall.js writer FILE OUT | bench --jobs N VOLUME-JSON...');
    process.exit(2);
  }
}
