import { spawn, type ChildProcess } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { VolumeLab } from '../../scripts/lab/volume-lab.js';
import { ddWrite } from '../support/volume-writes.js';
import { applianceCmd, repoRoot, type ApplianceProcess, type Daemon } from '../../scripts/lab/processes.js';
import { ScriptedAgent } from '../../appliance/testing/scripted-agent.js';
import { e2eFixture } from '../support/e2e-fixture.js';

/**
 * DESIGN.md §4.2's resource bounds, measured the way the issue found them
 * missing: a real appliance process, a real agent process backing up a real
 * loop-device volume, and an attacker process (test/support/attacker.ts, run through tsx)
 * hitting the appliance's WebSocket port from many loopback addresses. Under
 * each attack an honest full backup must complete, a probe agent's ping
 * round trip must stay at p99 ≤ 100 ms, and the appliance's peak RSS
 * (VmHWM) must stay ≤ 512 MiB. Needs `npm run build`.
 */
const P99_LIMIT_MS = 100;
const RSS_LIMIT = 512 * 1024 * 1024;
const MIN_PROBE_MS = 8000;

function memOf(pid: number): Promise<{ rss: number; hwm: number }> {
  return readFile(`/proc/${pid}/status`, 'utf8').then((s) => {
    const kb = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(s)![1]) * 1024;
    return { rss: kb('VmRSS'), hwm: kb('VmHWM') };
  });
}

function percentile(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.ceil((p / 100) * s.length) - 1)]!;
}

/** The attacker process; resolves once its attack is in place. */
async function startAttacker(kind: string, url: string): Promise<{ child: ChildProcess; stop: () => Promise<unknown> }> {
  const child = spawn(process.execPath, ['--import', 'tsx', join(repoRoot(), 'test', 'support', 'attacker.ts'), kind, url, 'db1'], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const lines = createInterface({ input: child.stdout! });
  const exited = new Promise<number | null>((r) => child.once('exit', (c) => r(c)));
  const stop = async () => {
    const last = new Promise<unknown>((r) => lines.on('line', (l) => r(JSON.parse(l))));
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    const kill = setTimeout(() => child.kill('SIGKILL'), 10_000);
    const [stats] = await Promise.all([Promise.race([last, exited.then(() => null)]), exited]);
    clearTimeout(kill);
    return stats;
  };
  try {
    await new Promise<void>((resolve, reject) => {
      lines.once('line', (l) => (JSON.parse(l).ready ? resolve() : reject(new Error(l))));
      void exited.then((c) => reject(new Error(`attacker ${kind} exited (${c}) before it was ready`)));
      setTimeout(() => reject(new Error(`attacker ${kind} not ready within 60 s`)), 60_000).unref();
    });
  } catch (e) {
    await stop();
    throw e;
  }
  return { child, stop };
}

describe('attacks against the appliance port (§4 resource bounds)', () => {
  let dir: string;
  let lab: VolumeLab;
  let appl: ApplianceProcess;
  let agent: Daemon;
  let probe: ScriptedAgent;
  const results: Record<string, unknown> = {};
  let baselineP99 = 0;
  const fx = e2eFixture();

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'bsn-attack-'));
    fx.defer('test directory', () => rm(dir, { recursive: true, force: true }));
    const dataDir = join(dir, 'data');
    await mkdir(dataDir);
    const db1 = (await applianceCmd(dataDir, ['agents', 'add', 'db1', '--json'])).json.token;
    const probeToken = (await applianceCmd(dataDir, ['agents', 'add', 'probe', '--json'])).json.token;
    appl = await fx.applianceProcess(dataDir, { logFile: join(dir, 'appliance.log') });
    lab = await fx.lab({ volumeSize: 256 << 20, poolSize: 1024 << 20, name: 'vol' });
    // 160 MiB of incompressible data: a full backup takes long enough to be under attack.
    await ddWrite(join(lab.volumeMount, 'data.bin'), { bs: 1 << 20, count: 160 });
    const configFile = join(dir, 'agent.json');
    await writeFile(configFile, JSON.stringify({
      appliance: appl.url, agent: 'db1', token: db1, stateDir: join(dir, 'agent-state'), volumes: [lab.volume], tracking: 'off',
      // One reader/compressor: on this 2-core machine the agent, the attacker and the appliance share the CPUs,
      // and the probe measures the appliance, not how many cores the agent can take from it.
      workers: 1,
    }));
    agent = fx.agentProcess(configFile, join(dir, 'agent.log'));
    const deadline = Date.now() + 30_000;
    while (!(await applianceCmd(dataDir, ['agents', 'list', '--json'])).json?.find((a: { name: string }) => a.name === 'db1')?.connected) {
      if (Date.now() > deadline) throw new Error(`the agent did not connect within 30 s; see ${join(dir, 'agent.log')}`);
      await new Promise((r) => setTimeout(r, 200));
    }
    probe = fx.add('probe', await ScriptedAgent.connect(appl.url, undefined, { localAddress: '127.0.0.1' }), (p) => p.close());
    await probe.login('probe', probeToken, []);
  });

  afterAll(async () => {
    console.log(JSON.stringify({ attackResults: results }, null, 1));
    await fx.dispose();
  });

  /** A full backup of the real volume while the probe pings; the numbers the goal is stated in. */
  async function measure(label: string) {
    const rtts: number[] = [];
    let backupDone = false;
    const started = Date.now();
    let backupMs = 0;
    const backup = applianceCmd(join(dir, 'data'), ['backup', 'db1', 'vol', '--full', '--json']).finally(() => {
      backupDone = true;
      backupMs = Date.now() - started;
    });
    while (!backupDone || Date.now() - started < MIN_PROBE_MS) {
      const t0 = performance.now();
      await probe.ping();
      rtts.push(performance.now() - t0);
      await new Promise((r) => setTimeout(r, 20));
    }
    const b = await backup;
    const mem = await memOf(appl.pid);
    const r = {
      backupOk: b.json?.ok === true, backupExit: b.exitCode, backupMs,
      pings: rtts.length, p50: +percentile(rtts, 50).toFixed(1), p99: +percentile(rtts, 99).toFixed(1), max: +Math.max(...rtts).toFixed(1),
      rssMiB: +(mem.rss / 2 ** 20).toFixed(1), hwmMiB: +(mem.hwm / 2 ** 20).toFixed(1), elapsedMs: Date.now() - started,
    };
    results[label] = r;
    expect(b.exitCode, `backup under ${label}: ${b.stdout} ${b.stderr}`).toBe(0);
    expect(r.backupOk).toBe(true);
    expect(mem.hwm, `appliance peak RSS under ${label} (${JSON.stringify(r)})`).toBeLessThanOrEqual(RSS_LIMIT);
    return r;
  }

  /**
   * The goal is absolute (p99 ≤ 100 ms). When the machine is so loaded that
   * the backup alone misses it (the baseline test then fails, saying so), an
   * attack is held to twice the baseline instead: it must not make it worse.
   */
  function checkLatency(label: string, r: { p99: number }) {
    const limit = baselineP99 > P99_LIMIT_MS ? 2 * baselineP99 : P99_LIMIT_MS;
    if (limit !== P99_LIMIT_MS) console.warn(`baseline p99 ${baselineP99} ms > ${P99_LIMIT_MS} ms: machine too loaded; ${label} held to ${limit} ms`);
    expect(r.p99, `probe ping p99 under ${label} (${JSON.stringify(r)})`).toBeLessThanOrEqual(limit);
  }

  async function underAttack(kind: string) {
    const attacker = await startAttacker(kind, appl.url);
    try {
      checkLatency(kind, await measure(kind));
    } finally {
      results[`${kind}:attacker`] = await attacker.stop();
    }
    // The appliance keeps serving afterwards, and its probe session survived.
    await probe.ping();
  }

  it('baseline: no attack', async () => {
    const r = await measure('baseline');
    baselineP99 = r.p99;
    expect(r.p99, `probe ping p99 with no attack: the machine is too loaded to measure the goal (${JSON.stringify(r)})`)
      .toBeLessThanOrEqual(P99_LIMIT_MS);
  });

  it('150 connections each holding an unfinished 8 MiB message before authenticating', async () => {
    await underAttack('preauth-big');
  });

  it('8 MiB frames before Hello, in a loop', async () => {
    await underAttack('big-frames');
  });

  it('wrong-proof floods for the real agent name from 16 sources', async () => {
    await underAttack('wrong-proof');
  });

  it('1000 idle connections that never authenticate (half never finish their HTTP request)', async () => {
    await underAttack('preauth-many');
  });
});
