/**
 * Quiesce benchmark (`node dist/scripts/bench-quiesce.js` after
 * `npm run build`; not a test). How long PostgreSQL is held for an
 * application-consistent image, under load, through the product path: an
 * in-process appliance, the agent as a real process (`blocksnap-agent run`),
 * PostgreSQL 15 with its data directory on a file-backed volume, pgbench
 * (-c 4) running the whole time, N incrementals back to back after a full.
 *
 *   primary: the agent quiesces the primary itself (pg_backup_start …
 *            pg_backup_stop around the snapshot).
 *   standby: pgbench on a primary in a plain directory, the agent quiesces a
 *            streaming standby on the volume (backup + replay pause).
 *
 * Per job: the freeze window (`freezeSeconds` of the job stats: fsfreeze to
 * thaw, clone included), the replay pause (`pausedSeconds` of the image's pg
 * info: pause request to resume) and the backup window (`backupSeconds`:
 * start call to the stop's return), and the job's wall time.
 * Goals: freeze p99 ≤ 0.5 s; replay paused p99 ≤ 1 s.
 * p99 of 50 samples is the nearest-rank 50th, i.e. the maximum.
 *
 * Env: BENCH_SNAPSHOTS (50), BENCH_SCALE (10), BENCH_CLIENTS (4),
 * BENCH_ROLES ("primary,standby"). Writes .bench/quiesce.json.
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { findPgServers } from './lab/version-lab.js';
import { PgCluster } from './lab/pg-cluster.js';
import { createStreamingStandby, currentLsn, waitReplayed } from './lab/pg-standby.js';
import { pgbenchTimed } from './lab/pgbench-timed.js';
import { createVolumeLab, type VolumeLab } from './lab/volume-lab.js';
import type { PgImageInfo } from '../appliance/store/pg-image-info.js';
import { startAppliance, type ApplianceHarness } from './lab/appliance-harness.js';
import { spawnAgent, type Daemon } from './lab/processes.js';
import { BlocksnapError } from '../proto/errors.js';

const N = Number(process.env.BENCH_SNAPSHOTS ?? 50);
const SCALE = Number(process.env.BENCH_SCALE ?? 10);
const CLIENTS = Number(process.env.BENCH_CLIENTS ?? 4);
const ROLES = (process.env.BENCH_ROLES ?? 'primary,standby').split(',') as Array<'primary' | 'standby'>;
const GiB = 1024 ** 3;
const say = (m: string) => process.stdout.write(m + '\n');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface JobSample { ok: boolean; error?: string; jobSeconds: number; freezeSeconds: number; pausedSeconds: number; backupSeconds: number; changeSource?: string; bytesRead?: number }
interface Dist { n: number; p50: number; p99: number; max: number; mean: number }

/** Nearest-rank percentile. */
function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.max(0, Math.ceil((p / 100) * s.length) - 1)] ?? NaN;
}
function dist(xs: number[]): Dist {
  return { n: xs.length, p50: pct(xs, 50), p99: pct(xs, 99), max: Math.max(...xs), mean: xs.reduce((a, b) => a + b, 0) / Math.max(1, xs.length) };
}

/** pgbench in back-to-back timed runs until `stop()`: the load never pauses for more than a reconnect. */
function backgroundLoad(pg: PgCluster) {
  let stopping = false;
  const tps: number[] = [];
  const done = (async () => {
    while (!stopping) tps.push((await pgbenchTimed(pg, { seconds: 10, clients: CLIENTS })).tps);
  })();
  return { tps, stop: async () => { stopping = true; await done; } };
}

async function runRole(role: 'primary' | 'standby', appl: ApplianceHarness, lab: VolumeLab, binDir: string): Promise<{ samples: JobSample[]; tps: number[] }> {
  const clusters: PgCluster[] = [];
  let agent: Daemon | undefined;
  try {
    let source: PgCluster;
    let target: PgCluster;
    if (role === 'primary') {
      source = target = new PgCluster({ dataDir: join(lab.volumeMount, 'pg'), binDir });
      clusters.push(source);
      await source.initdb();
      await source.start();
    } else {
      source = new PgCluster({ dataDir: join(lab.root, 'primary'), binDir });
      clusters.push(source);
      await source.initdb();
      await source.start();
    }
    say(`${role}: pgbench -i -s ${SCALE}`);
    await source.pgbenchInit(SCALE);
    if (role === 'standby') {
      const build = (await findPgServers({ only: ['15'] }))[0]!;
      target = await createStreamingStandby({ primary: source, build, dataDir: join(lab.volumeMount, 'pg'), applicationName: 'bench' });
      clusters.push(target);
      await waitReplayed(target, await currentLsn(source), 120_000);
    }
    const stateDir = join(lab.root, 'agent-state');
    await mkdir(stateDir, { recursive: true });
    const configFile = join(lab.root, 'agent.json');
    await writeFile(configFile, JSON.stringify({
      appliance: appl.url, agent: role, token: appl.tokens[role], stateDir, volumes: [lab.volume],
      postgres: { host: '127.0.0.1', port: target!.port, user: 'postgres', role },
    }));
    agent = spawnAgent(configFile, join(lab.root, 'agent.log'));
    for (let i = 0; !appl.app.router.connectedAgents().some((a) => a.agent === role); i++) {
      if (i > 300) throw new BlocksnapError('E_TIMEOUT', `agent ${role} did not connect; see ${join(lab.root, 'agent.log')}`);
      await sleep(100);
    }
    const job = async (mode: 'full' | 'incremental'): Promise<JobSample> => {
      const t0 = performance.now();
      const j = appl.app.router.startJob(role, 'pgdata', mode);
      const o = await j.done;
      const jobSeconds = (performance.now() - t0) / 1000;
      const st = (o.stats ?? {}) as Record<string, any>;
      if (!o.ok) return { ok: false, error: `${o.errorCode}: ${o.errorMessage}`, jobSeconds, freezeSeconds: NaN, pausedSeconds: NaN, backupSeconds: NaN };
      const pg = appl.app.catalog.image(o.imageId!)!.pg as unknown as PgImageInfo;
      return { ok: true, jobSeconds, freezeSeconds: Number(st.freezeSeconds), pausedSeconds: pg.pausedSeconds, backupSeconds: pg.backupSeconds, changeSource: st.changeSource, bytesRead: st.bytesRead };
    };
    const full = await job('full');
    if (!full.ok) throw new BlocksnapError('E_INTERNAL', `${role}: full failed: ${full.error}`);
    say(`${role}: full in ${full.jobSeconds.toFixed(1)} s; ${N} incrementals under pgbench -c ${CLIENTS}`);
    const load = backgroundLoad(source);
    const samples: JobSample[] = [];
    try {
      await sleep(2000); // the load is running before the first snapshot
      for (let i = 0; i < N; i++) {
        const s = await job('incremental');
        samples.push(s);
        if (!s.ok) say(`  ${i + 1}: FAILED ${s.error}`);
        else if ((i + 1) % 10 === 0) say(`  ${i + 1}: freeze ${s.freezeSeconds.toFixed(3)} s, paused ${s.pausedSeconds.toFixed(3)} s, backup ${s.backupSeconds.toFixed(3)} s, job ${s.jobSeconds.toFixed(2)} s`);
      }
    } finally {
      await load.stop();
    }
    return { samples, tps: load.tps };
  } finally {
    await agent?.stop().catch((e: unknown) => say(`agent stop: ${String(e)}`));
    for (const c of clusters.reverse()) await c.destroy().catch((e: unknown) => say(`cluster destroy: ${String(e)}`));
  }
}

async function main(): Promise<void> {
  const pg15 = (await findPgServers({ only: ['15'] }))[0];
  if (!pg15) throw new BlocksnapError('E_PG', 'PostgreSQL 15 not found');
  const result: Record<string, unknown> = { started: new Date().toISOString(), snapshots: N, scale: SCALE, clients: CLIENTS, loadavgStart: loadavg().map((x) => x.toFixed(2)).join(' '), roles: {} };
  const rows: string[] = [];
  for (const role of ROLES) {
    let appl: ApplianceHarness | undefined;
    let lab: VolumeLab | undefined;
    try {
      lab = await createVolumeLab({ volumeSize: GiB, poolSize: 4 * GiB, name: 'pgdata' });
      await mkdir(join(lab.root, 'appliance'));
      appl = await startAppliance([role], { auditEvery: 0, dataDir: join(lab.root, 'appliance') });
      const { samples, tps } = await runRole(role, appl, lab, pg15.binDir);
      const ok = samples.filter((s) => s.ok);
      const d = {
        freeze: dist(ok.map((s) => s.freezeSeconds)), paused: dist(ok.map((s) => s.pausedSeconds)),
        backup: dist(ok.map((s) => s.backupSeconds)), job: dist(ok.map((s) => s.jobSeconds)),
      };
      (result.roles as Record<string, unknown>)[role] = { ...d, failed: samples.length - ok.length, pgbenchTps: tps, samples };
      const f = (x: number) => x.toFixed(3);
      rows.push(`| ${role} | ${ok.length}/${samples.length} | ${f(d.freeze.p50)} | ${f(d.freeze.p99)} | ${role === 'standby' ? `${f(d.paused.p50)} | ${f(d.paused.p99)}` : '– | –'} | ${f(d.backup.p50)} | ${f(d.backup.p99)} | ${f(d.job.p50)} | ${tps.length ? (tps.reduce((a, b) => a + b, 0) / tps.length).toFixed(0) : '–'} |`);
    } finally {
      await appl?.close().catch((e: unknown) => say(`appliance close: ${String(e)}`));
      await lab?.destroy().catch((e: unknown) => say(`lab destroy: ${String(e)}`));
    }
  }
  result.loadavgEnd = loadavg().map((x) => x.toFixed(2)).join(' ');
  say('');
  say(`PostgreSQL 15, pgbench -s ${SCALE} -c ${CLIENTS}, ${N} incrementals back to back per role (seconds; p99 = nearest rank)`);
  say('');
  say('| role | ok | freeze p50 | freeze p99 | replay paused p50 | replay paused p99 | backup p50 | backup p99 | job p50 | pgbench tps |');
  say('|---|---|---|---|---|---|---|---|---|---|');
  for (const r of rows) say(r);
  say('');
  say(`goals: freeze p99 ≤ 0.5 s, replay paused p99 ≤ 1 s; load average ${result.loadavgStart as string} → ${result.loadavgEnd as string}`);
  await mkdir('.bench', { recursive: true });
  await writeFile(join('.bench', 'quiesce.json'), JSON.stringify(result, null, 2) + '\n');
  say('wrote .bench/quiesce.json');
}

main().catch((e: unknown) => {
  console.error(e);
  process.exitCode = 1;
});
