/**
 * blocksnap demo (`npm run demo`): a real PostgreSQL 15 on a real file-backed
 * volume (ext4 on a loop device, its image on an XFS reflink pool), the real
 * appliance and agent CLIs as separate processes, PostgreSQL quiesced around
 * each snapshot, a full backup, pgbench, an incremental (chosen by the kernel
 * write tracker), both images exported and compared byte for byte with the
 * snapshots they came from, PostgreSQL started on the exported
 * incremental with `blocksnap-agent prepare`, and the incremental mounted
 * instantly (`blocksnap-agent mount`) with PostgreSQL answering from it. Everything it creates is released at the end,
 * also on failure.
 */
import { execa } from 'execa';
import pg from 'pg';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { PgCluster } from './lab/pg-cluster.js';
import { createVolumeLab, type VolumeLab } from './lab/volume-lab.js';
import { agentCli, applianceCmd, spawnAgent, spawnAppliance, type ApplianceProcess, type Daemon } from './lab/processes.js';
import { attachLoop, detachLoop } from './lab/loop.js';
import { exitAfterFlush } from '../proto/shared/cli-exit.js';

const GiB = 1024 ** 3;
const scale = Number(process.env.DEMO_SCALE ?? 20);
const transactions = Number(process.env.DEMO_TRANSACTIONS ?? 2000);

const t0 = performance.now();
function say(msg: string): void {
  process.stdout.write(`[${((performance.now() - t0) / 1000).toFixed(1).padStart(6)} s] ${msg}\n`);
}

async function main(): Promise<void> {
  let lab: VolumeLab | undefined;
  let pg: PgCluster | undefined;
  let appliance: ApplianceProcess | undefined;
  let agent: Daemon | undefined;
  try {
    say('creating an XFS reflink pool and a 2 GiB ext4 volume on loop devices');
    lab = await createVolumeLab({ volumeSize: 2 * GiB, poolSize: 8 * GiB, name: 'pgdata' });
    say(`volume ${lab.volumeDevice} (image ${lab.volumeImage}) mounted at ${lab.volumeMount}`);

    pg = new PgCluster({ dataDir: join(lab.volumeMount, 'pg') });
    say('initdb (data checksums on), start PostgreSQL 15');
    await pg.initdb();
    await pg.start();
    say(`pgbench -i -s ${scale}`);
    await pg.pgbenchInit(scale);

    const dataDir = join(lab.root, 'appliance', 'data');
    await mkdir(dataDir, { recursive: true });
    const add = await applianceCmd(dataDir, ['agents', 'add', 'db1', '--json']);
    if (add.exitCode !== 0) throw new Error(`agents add failed: ${add.stderr}`);
    appliance = await spawnAppliance(dataDir, { logFile: join(lab.root, 'appliance.log') });
    say(`appliance pid ${appliance.pid} listening on ${appliance.url}`);

    const retained = join(lab.poolMount, 'retained');
    const config = {
      appliance: appliance.url, agent: 'db1', token: add.json.token, stateDir: join(lab.root, 'agent-state'),
      volumes: [lab.volume], retainSnapshotsDir: retained,
      // Quiesce PostgreSQL around every snapshot: backup label, LSNs and WAL travel with the image.
      postgres: { host: '127.0.0.1', port: pg.port, user: 'postgres', role: 'primary' },
    };
    const configFile = join(lab.root, 'agent.json');
    await writeFile(configFile, JSON.stringify(config, null, 2), { mode: 0o600 });
    agent = spawnAgent(configFile, join(lab.root, 'agent.log'));
    say(`agent pid ${agent.pid} started`);
    await waitConnected(dataDir);

    const rows: Row[] = [];
    say('full backup');
    rows.push(await backup(dataDir, true));
    say(`pgbench: ${transactions} transactions`);
    const bench = await pg.pgbench({ transactions: Math.ceil(transactions / 4), clients: 4 });
    say(`  ${bench.transactions} transactions, ${bench.tps.toFixed(0)} tps`);
    say('incremental backup');
    rows.push(await backup(dataDir, false));

    say('exporting both images and comparing them with their snapshots');
    for (const r of rows) {
      const out = join(lab.poolMount, `${r.imageId}.raw`);
      const ex = await applianceCmd(dataDir, ['export', r.imageId, '--to', out, '--json']);
      if (ex.exitCode !== 0) throw new Error(`export failed: ${ex.stderr}`);
      const snap = join(retained, `pgdata_${r.jobId}.img`);
      const t = performance.now();
      const cmp = await execa('cmp', [out, snap], { reject: false });
      r.identical = cmp.exitCode === 0;
      say(`  ${r.imageId} (${r.kind}): exported in ${ex.json.seconds.toFixed(1)} s; ${r.identical ? 'byte-identical to its snapshot' : 'DIFFERS: ' + cmp.stdout} (cmp ${((performance.now() - t) / 1000).toFixed(1)} s)`);
    }
    const show = await applianceCmd(dataDir, ['images', 'show', rows[1]!.imageId]);
    say('images show (incremental):\n' + show.stdout.trimEnd().split('\n').map((l) => '    ' + l).join('\n'));

    say('starting PostgreSQL on the exported incremental (attach, mount, blocksnap-agent prepare, pg_ctl start)');
    const expected = Number((await pg.query<{ n: string }>('select count(*)::text as n from pgbench_history'))[0]!.n);
    const restoredRows = await startOnExport(lab, join(lab.poolMount, `${rows[1]!.imageId}.raw`));
    say(`  restored server answers: pgbench_history has ${restoredRows} rows (source had ${expected} after the incremental's pgbench run)`);
    if (restoredRows !== expected) throw new Error('restored data differs from the source');
    say('instant mount of the incremental (blocksnap-agent mount: NBD export + copy-on-write overlay, PostgreSQL started on it)');
    const mounted = await instantMount(configFile, rows[1]!.imageId);
    say(`  first query answered ${mounted.secondsToFirstQuery.toFixed(2)} s after the mount command; pgbench_history has ${mounted.rows} rows; unmounted`);
    if (mounted.rows !== expected) throw new Error('the mounted image\'s data differs from the source');
    const verify = await applianceCmd(dataDir, ['verify']);
    say(`verify: ${verify.stdout.trim().split('\n').join('; ')}`);

    printTable(rows);
    if (!rows.every((r) => r.identical) || verify.exitCode !== 0) throw new Error('demo failed: an image is not identical to its snapshot');
    say('demo OK');
  } finally {
    say('cleaning up');
    await agent?.stop().catch((e) => say(`agent stop: ${e}`));
    await appliance?.stop().catch((e) => say(`appliance stop: ${e}`));
    await pg?.destroy().catch((e) => say(`postgres stop: ${e}`));
    await lab?.destroy().catch((e) => say(`lab cleanup: ${e}`));
  }
}

interface Row {
  kind: string; jobId: string; imageId: string; identical?: boolean;
  chunksTotal: number; chunksRead: number; chunksSent: number; chunksStored: number;
  bytesRead: number; bytesSent: number; bytesStored: number; seconds: number; freezeSeconds: number;
}

/** Attach + mount an export, prepare it with the agent CLI, start PostgreSQL on it, count rows, release it all. */
async function startOnExport(lab: VolumeLab, raw: string): Promise<number> {
  const mnt = join(lab.root, 'restored');
  await mkdir(mnt, { recursive: true });
  const dev = await attachLoop(raw);
  let restored: PgCluster | undefined;
  let mounted = false;
  try {
    await execa('mount', ['-t', 'ext4', '-o', 'noatime', dev, mnt]);
    mounted = true;
    const prep = await execa(process.execPath, [agentCli(), 'prepare', join(mnt, 'pg'), '--image', raw]);
    say(`  ${prep.stdout.trim()}`);
    restored = new PgCluster({ dataDir: join(mnt, 'pg') });
    const t = performance.now();
    await restored.start();
    say(`  PostgreSQL accepting connections ${((performance.now() - t) / 1000).toFixed(1)} s after start (WAL replay to the stop LSN included)`);
    return Number((await restored.query<{ n: string }>('select count(*)::text as n from pgbench_history'))[0]!.n);
  } finally {
    await restored?.destroy().catch(() => undefined);
    if (mounted) await execa('umount', [mnt]).catch(() => undefined);
    await detachLoop(dev).catch(() => undefined);
  }
}

/** `blocksnap-agent mount IMAGE`, count rows on the running copy, `blocksnap-agent unmount` (also when the count fails). */
async function instantMount(configFile: string, imageId: string): Promise<{ secondsToFirstQuery: number; rows: number }> {
  const agentCmd = (args: string[]) => execa(process.execPath, [agentCli(), ...args, '--config', configFile], { reject: false, stdin: 'ignore' });
  const m = await agentCmd(['mount', imageId, '--json']);
  if (m.exitCode !== 0) throw new Error(`mount failed: ${m.stderr}`);
  const mount = JSON.parse(String(m.stdout)) as { mountId: string; connection: string; secondsToFirstQuery: number };
  try {
    say(`  ${mount.connection}`);
    // The copy's libpq connection string (host = its own socket directory, port, user, dbname).
    const kv = Object.fromEntries(mount.connection.split(' ').map((p) => p.split('=') as [string, string]));
    const client = new pg.Client({ host: kv.host, port: Number(kv.port), user: kv.user, database: kv.dbname });
    await client.connect();
    try {
      const rows = Number((await client.query<{ n: string }>('select count(*)::text as n from pgbench_history')).rows[0]!.n);
      return { secondsToFirstQuery: mount.secondsToFirstQuery, rows };
    } finally {
      await client.end().catch(() => undefined);
    }
  } finally {
    const u = await agentCmd(['unmount', mount.mountId]);
    if (u.exitCode !== 0) say(`  unmount failed: ${u.stderr}`);
  }
}

async function waitConnected(dataDir: string): Promise<void> {
  for (let i = 0; i < 100; i++) {
    const r = await applianceCmd(dataDir, ['agents', 'list', '--json']);
    if (r.json?.some((a: any) => a.name === 'db1' && a.connected)) return;
    await new Promise((res) => setTimeout(res, 200));
  }
  throw new Error('agent did not connect within 20 s; see agent.log');
}

async function backup(dataDir: string, full: boolean): Promise<Row> {
  const started = performance.now();
  const r = await applianceCmd(dataDir, ['backup', 'db1', 'pgdata', ...(full ? ['--full'] : []), '--json']);
  const seconds = (performance.now() - started) / 1000;
  if (r.exitCode !== 0 || !r.json?.ok) throw new Error(`backup failed: ${r.stdout} ${r.stderr}`);
  const s = r.json.stats ?? {};
  const row: Row = {
    kind: full ? 'full' : 'incremental', jobId: r.json.jobId, imageId: r.json.imageId,
    chunksTotal: s.chunksTotal, chunksRead: s.chunksRead, chunksSent: s.chunksSent, chunksStored: s.chunksStored,
    bytesRead: s.bytesRead, bytesSent: s.bytesSent, bytesStored: s.bytesStored, seconds, freezeSeconds: s.freezeSeconds,
  };
  say(`  job ${row.jobId} → image ${row.imageId} in ${seconds.toFixed(2)} s (frozen ${(row.freezeSeconds * 1000).toFixed(0)} ms)`);
  return row;
}

function printTable(rows: Row[]): void {
  const mb = (n: number) => (n / 1e6).toFixed(1);
  const head = ['image', 'kind', 'chunks', 'read', 'sent', 'stored', 'MB read', 'MB sent', 'MB stored', 'seconds', 'identical'];
  const body = rows.map((r) => [
    r.imageId, r.kind, String(r.chunksTotal), String(r.chunksRead), String(r.chunksSent), String(r.chunksStored),
    mb(r.bytesRead), mb(r.bytesSent), mb(r.bytesStored), r.seconds.toFixed(2), r.identical ? 'yes' : 'NO',
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i]!.length)));
  const line = (cols: string[]) => cols.map((c, i) => c.padStart(widths[i]!)).join('  ');
  process.stdout.write('\n' + line(head) + '\n' + widths.map((w) => '-'.repeat(w)).join('  ') + '\n');
  for (const b of body) process.stdout.write(line(b) + '\n');
  process.stdout.write('\n');
}

main().then(
  () => void exitAfterFlush(0),
  (e) => {
    process.stderr.write(`demo: ${e?.stack ?? e}\n`);
    void exitAfterFlush(1);
  },
);
