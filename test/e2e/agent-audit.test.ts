import { execa } from 'execa';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, open, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { AuditResult } from '../../agent/audit/audit-run.js';
import { agentSocketPath, callAgent, type AgentStatus } from '../../agent/control-server.js';
import { snapshotDirOf } from '../../agent/snapshot/reflink-snapshot-provider.js';
import { compareExportWithSnapshot } from '../support/export-compare.js';
import { PgCluster } from '../../scripts/lab/pg-cluster.js';
import type { VolumeLab } from '../../scripts/lab/volume-lab.js';
import { ddWrite } from '../support/volume-writes.js';
import { listInstances, parseInstanceName, tracefsRoot } from '../../agent/cbt/tracefs/tracefs-instance.js';
import type { ApplianceHarness } from '../../scripts/lab/appliance-harness.js';
import { agentCli, type Daemon } from '../../scripts/lab/processes.js';
import { e2eFixture } from '../support/e2e-fixture.js';
import { waitFor } from '../support/wait-for.js';

/**
 * `blocksnap-agent audit VOLUME` and `status`, the compiled CLI (`npm run
 * build` first) against a real agent process over its control socket, on a
 * live PostgreSQL volume: the audit checks the tracker against a full
 * comparison, holds the volume while it runs, commits nothing and gives its
 * generation back — the next tracker incremental is byte-identical to its
 * snapshot. A write behind the loop device's back (the tracker's documented
 * blind spot) makes a real miss: exit 1, and the tracker is invalidated.
 */
type Stats = Record<string, unknown> & { changeSource: string; fallbackReason: string; chunksSent: number };
type Cmd = { exitCode: number; stdout: string; stderr: string; json?: any };

describe('blocksnap-agent audit / status against the running agent', () => {
  const fx = e2eFixture();
  let lab: VolumeLab;
  let pg: PgCluster;
  let appl: ApplianceHarness;
  let agent: Daemon | undefined;
  let retained: string;
  let stateDir: string;
  let configFile: string;
  let logFile: string;

  beforeAll(async () => {
    expect(existsSync(agentCli()), `${agentCli()} missing: run npm run build`).toBe(true);
    lab = await fx.lab({ volumeSize: 512 << 20, poolSize: 3 * 1024 ** 3, name: 'pgdata' });
    pg = await fx.pg({ dataDir: join(lab.volumeMount, 'pg') });
    await pg.pgbenchInit(5);
    appl = await fx.appliance(['db1'], { auditEvery: 0 });
    retained = join(lab.poolMount, 'retained');
    stateDir = join(lab.root, 'agent-state');
    await mkdir(stateDir, { recursive: true });
    configFile = join(lab.root, 'agent.json');
    logFile = join(lab.root, 'agent.log');
    await writeFile(configFile, JSON.stringify({
      appliance: appl.url, agent: 'db1', token: appl.tokens.db1, stateDir, volumes: [lab.volume], retainSnapshotsDir: retained,
      postgres: { host: '127.0.0.1', port: pg.port, user: 'postgres', role: 'primary' },
    }));
    agent = fx.agentProcess(configFile, logFile, { BLOCKSNAP_LOG: 'info' });
    const connected = () => appl.app.router.connectedAgents().some((a) => a.agent === 'db1');
    await waitFor('the agent to connect (or exit)', () => connected() || agent!.child.exitCode !== null, { timeoutMs: 15_000, everyMs: 100 }).catch(() => undefined);
    if (!connected()) {
      throw new Error(`agent did not connect; log:\n${(await readFile(logFile, 'utf8').catch(() => '')).slice(-3000)}`);
    }
  });

  afterAll(() => fx.dispose());

  async function cli(args: string[]): Promise<Cmd> {
    const r = await execa(process.execPath, [agentCli(), ...args, '--config', configFile], { reject: false, stdin: 'ignore', timeout: 120_000 });
    let json;
    try {
      json = args.includes('--json') && r.stdout ? JSON.parse(String(r.stdout)) : undefined;
    } catch {
      json = undefined;
    }
    return { exitCode: r.exitCode ?? -1, stdout: String(r.stdout), stderr: String(r.stderr), json };
  }

  const snapFiles = async () => {
    const dir = snapshotDirOf(lab.volume.image!);
    return existsSync(dir) ? (await readdir(dir)).filter((f) => f.includes('.snap')) : [];
  };

  /** Retained audit snapshots are not needed: drop them. */
  async function dropAuditClones(): Promise<void> {
    for (const f of existsSync(retained) ? await readdir(retained) : []) if (f.includes('audit-')) await rm(join(retained, f));
  }

  async function backup(mode: 'full' | 'incremental'): Promise<{ imageId: string; stats: Stats }> {
    const job = appl.app.router.startJob('db1', 'pgdata', mode);
    const outcome = await job.done;
    expect(outcome, JSON.stringify(outcome)).toMatchObject({ ok: true });
    const img = appl.app.catalog.image(outcome.imageId!)!;
    const snap = join(retained, `pgdata_${job.id}.img`);
    const cmp = await compareExportWithSnapshot(appl.app.store, img.rootDigest, snap, lab.poolMount);
    expect(cmp.identical, `export of ${img.id} differs from its snapshot: ${cmp.detail}`).toBe(true);
    await rm(snap, { force: true });
    return { imageId: img.id, stats: appl.app.catalog.job(job.id)!.stats as Stats };
  }

  async function audit(): Promise<{ cmd: Cmd; r: AuditResult }> {
    const cmd = await cli(['audit', 'pgdata', '--json']);
    expect(cmd.json, `audit printed no JSON: ${cmd.stderr}`).toBeDefined();
    await dropAuditClones();
    return { cmd, r: cmd.json as AuditResult };
  }

  it('refuses to audit before any image is committed (E_NOT_FOUND, exit 1) and takes no snapshot', async () => {
    const r = await cli(['audit', 'pgdata', '--json']);
    expect(r.exitCode).toBe(1);
    expect(r.stderr).toMatch(/E_NOT_FOUND: .*no committed image to compare against/);
    expect(await snapFiles()).toEqual([]);
  });

  it('names an unknown volume clearly (E_UNKNOWN_VOLUME, exit 1)', async () => {
    const r = await cli(['audit', 'nosuchvol']);
    expect(r.exitCode).toBe(1);
    expect(r.stderr).toMatch(/E_UNKNOWN_VOLUME: no volume nosuchvol on agent db1 \(configured: pgdata\)/);
  });

  it('status reports the live process: connected, its volume, the tracker', async () => {
    const r = await cli(['status', '--json']);
    expect(r.exitCode, r.stderr).toBe(0);
    const s = r.json as AgentStatus;
    expect(s).toMatchObject({ agent: 'db1', pid: agent!.pid, connected: true, trackingMode: 'tracefs' });
    expect(s.volumes.map((v) => v.name)).toEqual(['pgdata']);
    expect(s.volumes[0]!.tracking).not.toBeNull();
    expect(s.volumes[0]!.busy).toBeNull();
    const text = await cli(['status']);
    expect(text.stdout).toMatch(/^agent db1 \(pid \d+, 0\.1\.0\): connected to the appliance; tracking tracefs\npgdata\t/);
  });

  it('a second agent on the same state directory is refused (E_BUSY) before it touches anything; the first keeps its socket', async () => {
    const second = fx.agentProcess(configFile, join(lab.root, 'agent-second.log'));
    const code = await Promise.race([second.exited, sleep(30_000).then(() => 'timeout' as const)]);
    if (code === 'timeout') await second.stop();
    expect(code).toBe(75); // E_BUSY's own exit status (EX_TEMPFAIL): "already running", not "failed"
    expect(await readFile(join(lab.root, 'agent-second.log'), 'utf8')).toMatch(/E_BUSY: another agent is running on state directory/);
    expect((await callAgent<AgentStatus>(stateDir, 'GET', '/v1/status')).pid).toBe(agent!.pid);
  });

  it('after a full and pgbench: 0 missed, nothing committed or left; the next tracker incremental still carries the audited changes', async () => {
    const full = await backup('full');
    await pg.pgbench({ transactions: 300, clients: 2 });
    // Written before the audit and never again: only the absorbed generation can bring it to the next incremental.
    await ddWrite(join(lab.volumeMount, 'before-audit.bin'), { bs: 1 << 20, count: 4 });
    const images = appl.app.catalog.listImages().length;

    const { cmd, r } = await audit();
    expect(cmd.exitCode, cmd.stderr).toBe(0);
    if (!r.valid) throw new Error(`not audited: ${r.reason}`);
    expect(r.basisImageId).toBe(full.imageId);
    expect(r.missed).toBe(0);
    expect(r.missedSample).toEqual([]);
    expect(r.changed).toBeGreaterThanOrEqual(64); // at least the 4 MiB file at 64 KiB chunks
    expect(r.tracked).toBeGreaterThanOrEqual(r.changed);
    expect(r.extra).toBe(r.tracked - r.changed);
    expect(appl.app.catalog.listImages().length).toBe(images);
    expect(await snapFiles()).toEqual([]);
    const text = await cli(['audit', 'pgdata']);
    await dropAuditClones();
    expect(text.exitCode).toBe(0);
    expect(text.stdout).toMatch(/^pgdata: audit passed: 0 missed; \d+ changed, \d+ tracked/);

    const next = await backup('incremental');
    expect(next.stats.changeSource).toBe('tracker');
    expect(next.stats.fallbackReason).toBe('');
    expect(next.stats.chunksSent).toBeGreaterThanOrEqual(64);
  });

  it('holds the volume while it runs: a job and a second audit arriving meanwhile get E_BUSY', async () => {
    await pg.pgbench({ transactions: 200, clients: 2 });
    const running = audit();
    let seen: AgentStatus | undefined;
    for (let i = 0; i < 3000 && !seen; i++) {
      const s = await callAgent<AgentStatus>(stateDir, 'GET', '/v1/status');
      if (s.volumes[0]!.busy === 'an audit') seen = s;
      else await sleep(5);
    }
    expect(seen, 'the audit must be seen holding the volume').toBeDefined();
    const job = appl.app.router.startJob('db1', 'pgdata', 'incremental');
    const second = callAgent(stateDir, 'POST', '/v1/audit', { volume: 'pgdata' }).catch((e) => e);
    const outcome = await job.done;
    expect(outcome).toMatchObject({ ok: false, errorCode: 'E_BUSY' });
    expect(await second).toMatchObject({ code: 'E_BUSY', message: expect.stringMatching(/pgdata is busy: an audit/) });
    const { cmd, r } = await running;
    expect(cmd.exitCode, cmd.stderr).toBe(0);
    expect(r).toMatchObject({ valid: true, missed: 0 });
    expect((await backup('incremental')).stats.changeSource).toBe('tracker');
  });

  it('a write behind the loop device (the blind spot) is a real miss: exit 1, the tracker invalidated, the next job compares digests', async () => {
    const file = join(lab.volumeMount, 'bypassed.bin');
    await ddWrite(file, { bs: 1 << 20, count: 1 });
    await backup('incremental');
    const chunk = await firstWholeChunk(file, lab.volume.chunkSize);
    const fh = await open(lab.volume.image!, 'r+');
    try {
      await fh.write(randomBytes(lab.volume.chunkSize), 0, lab.volume.chunkSize, chunk * lab.volume.chunkSize);
      await fh.sync();
    } finally {
      await fh.close();
    }

    const { cmd, r } = await audit();
    expect(cmd.exitCode).toBe(1);
    if (!r.valid) throw new Error(`not audited: ${r.reason}`);
    expect(r.missed).toBe(1);
    expect(r.missedSample).toEqual([chunk]);
    const s = (await cli(['status', '--json'])).json as AgentStatus;
    expect(s.volumes[0]!.tracking!.validity).toMatchObject({ valid: false, reason: expect.stringMatching(/audit found 1 changed chunks/) });
    const notAudited = await cli(['audit', 'pgdata']);
    expect(notAudited.exitCode).toBe(3);
    expect(notAudited.stdout).toMatch(/^pgdata: not audited: tracker: .*audit found 1 changed chunks/);
    expect(await snapFiles()).toEqual([]);

    const next = await backup('incremental');
    expect(next.stats.changeSource).toBe('digest-compare');
    expect(next.stats.fallbackReason).toMatch(/audit found 1 changed chunks/);
    // The job re-opened a trusted generation: auditing works again.
    await pg.pgbench({ transactions: 100, clients: 2 });
    const again = await audit();
    expect(again.cmd.exitCode, again.cmd.stderr).toBe(0);
    expect(again.r).toMatchObject({ valid: true, missed: 0, basisImageId: next.imageId });
  });

  it('with the agent stopped: the CLI says no agent is running (exit 1); nothing is left behind', async () => {
    const pid = agent!.pid;
    expect(await agent!.stop()).toBe(0);
    for (const args of [['audit', 'pgdata'], ['status']]) {
      const r = await cli(args);
      expect(r.exitCode).toBe(1);
      expect(r.stderr).toContain(`E_NOT_FOUND: no agent running for state dir ${stateDir}`);
    }
    expect(existsSync(agentSocketPath(stateDir))).toBe(false);
    expect(await snapFiles()).toEqual([]);
    const owners = (await listInstances(await tracefsRoot({ mount: false }))).map((n) => parseInstanceName(n)?.pid);
    expect(owners).not.toContain(pid);
  });
});

/** Index of the first chunk lying wholly inside `file`'s first extent on the volume (FIEMAP, 512-byte units). */
async function firstWholeChunk(file: string, chunkSize: number): Promise<number> {
  const r = await execa('xfs_io', ['-r', '-c', 'fiemap -v', file], { stdin: 'ignore' });
  const m = /^\s*0:\s*\[(\d+)\.\.(\d+)\]:\s*(\d+)\.\.(\d+)/m.exec(String(r.stdout));
  if (!m) throw new Error(`unexpected fiemap output: ${String(r.stdout)}`);
  const start = Number(m[3]) * 512;
  const end = (Number(m[4]) + 1) * 512;
  const chunk = Math.ceil(start / chunkSize);
  if ((chunk + 1) * chunkSize > end) throw new Error(`no whole chunk inside the extent ${start}..${end}`);
  return chunk;
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
