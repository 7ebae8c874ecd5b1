/**
 * A real PostgreSQL cluster for tests: initdb (with data checksums) into a
 * directory on a test volume, a postmaster on a free TCP port of 127.0.0.1
 * with its Unix socket and log in a private run directory, pgbench load.
 * Server commands run as the `postgres` OS user; clients connect over TCP.
 * The postmaster is recorded (data dir, then PID and start time) in a ledger
 * so a killed run's cluster is stopped by `cleanupLeftovers`, by PID only.
 */
import { createHash } from 'node:crypto';
import { access, chmod, chown, mkdir, mkdtemp, readFile, realpath, rename, rm, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { execa, type Options as ExecaOptions } from 'execa';
import pg from 'pg';
import { BlocksnapError } from '../../proto/errors.js';
import { isPostmasterOf, releaseResources, stopPostmasterByPid } from './cleanup.js';
import { Ledger } from './ledger.js';
import { isAlive, processStartTime } from '../../proto/shared/proc.js';
import { freePort } from '../../proto/shared/free-port.js';

export interface PgClusterOptions {
  /** Data directory (created, owned by the OS user); its parents must be traversable by that user. */
  dataDir: string;
  /** Unix socket and server log; default a fresh temp dir, removed by `destroy`. */
  runDir?: string;
  /** Server binaries: initdb, pg_ctl, postgres. */
  binDir?: string;
  /** Client binaries (pgbench): the 15 clients also serve other server versions. */
  clientBinDir?: string;
  osUser?: string;
  /** Fixed port; default a free one (retried if another process takes it first). */
  port?: number;
  /** Extra server settings passed as `-c name=value`. */
  settings?: Record<string, string>;
  ledgerDir?: string;
  /**
   * `initdb` copies a per-build template made by one real initdb (default,
   * when a test run set `PG_TEMPLATES_ENV`; elsewhere, e.g. the demo and the
   * benchmarks, initdb runs per cluster): every cluster of a build then
   * shares one system identifier. `false` runs initdb itself, for a test
   * that needs an identifier of its own.
   */
  template?: boolean;
}

export interface PgbenchResult {
  tps: number;
  transactions: number;
  output: string;
}

const PG15 = '/usr/lib/postgresql/15/bin';

/**
 * The directory the template data directories live in, set for one test run
 * by test/support/pg-templates-setup.ts (which removes it at the end): a
 * template outlives a cluster, so it must belong to something that ends.
 */
export const PG_TEMPLATES_ENV = 'BLOCKSNAP_PG_TEMPLATES';

async function osUserIds(user: string): Promise<{ uid: number; gid: number }> {
  const line = (await readFile('/etc/passwd', 'utf8')).split('\n').find((l) => l.startsWith(`${user}:`));
  const [, , uid, gid] = line?.split(':') ?? [];
  if (!uid || !gid) throw new BlocksnapError('E_PG', `no OS user ${user} in /etc/passwd`);
  return { uid: Number(uid), gid: Number(gid) };
}


/** What every test cluster is made with (after `-N -D DIR`). */
const INITDB_ARGS = ['-U', 'postgres', '-A', 'trust', '--data-checksums', '-E', 'UTF8', '--locale=C'];

async function syncFs(dir: string): Promise<void> {
  const s = await execa('sync', ['-f', dir], { reject: false, stdin: 'ignore', timeout: 180_000 });
  if (s.exitCode !== 0) throw new BlocksnapError('E_PG', `sync -f ${dir} failed: ${String(s.stderr || s.shortMessage).trim()}`, { cause: s });
}

export class PgCluster {
  readonly dataDir: string;
  readonly binDir: string;
  readonly clientBinDir: string;
  private readonly osUser: string;
  private readonly settings: Record<string, string>;
  private runDirOpt: string | undefined;
  private ledger: Ledger | undefined;
  private postmasterIndex: number | undefined;
  private _port: number | undefined;
  private _pid: number | undefined;
  private startTime: string | null = null;

  constructor(private readonly opts: PgClusterOptions) {
    this.dataDir = path.resolve(opts.dataDir);
    this.binDir = opts.binDir ?? PG15;
    this.clientBinDir = opts.clientBinDir ?? PG15;
    this.osUser = opts.osUser ?? 'postgres';
    this.settings = opts.settings ?? {};
    this.runDirOpt = opts.runDir && path.resolve(opts.runDir);
    this._port = opts.port;
  }

  get port(): number {
    if (this._port === undefined) throw new BlocksnapError('E_PG', 'cluster not started');
    return this._port;
  }

  /** PID of the running postmaster, if started. */
  get pid(): number | undefined {
    return this._pid;
  }

  get runDir(): string | undefined {
    return this.runDirOpt;
  }

  get logFile(): string | undefined {
    return this.runDirOpt && path.join(this.runDirOpt, 'postgres.log');
  }

  private async getLedger(): Promise<Ledger> {
    this.ledger ??= await Ledger.create('pg-cluster', this.opts.ledgerDir);
    return this.ledger;
  }

  private async asOsUser(file: string, args: string[], extra: ExecaOptions = {}) {
    const { uid, gid } = await osUserIds(this.osUser);
    return execa(file, args, {
      uid,
      gid,
      cwd: '/',
      // The harness's own PG* variables must not leak into the server tools.
      extendEnv: false,
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', LC_ALL: 'C', LANG: 'C', TZ: 'UTC' },
      reject: false,
      stdin: 'ignore',
      timeout: 180_000,
      ...extra,
    });
  }

  private async ensureRunDir(): Promise<string> {
    if (!this.runDirOpt) {
      const dir = await realpath(await mkdtemp(path.join(os.tmpdir(), 'blocksnap-pg-')));
      await (await this.getLedger()).add({ kind: 'dir', path: dir });
      this.runDirOpt = dir;
    } else {
      await mkdir(this.runDirOpt, { recursive: true });
    }
    const { uid, gid } = await osUserIds(this.osUser);
    await chown(this.runDirOpt, uid, gid);
    return this.runDirOpt;
  }

  /**
   * A new cluster in `dataDir` (initdb with data checksums, C locale, trust),
   * durable on return. By default a copy of this build's template (see
   * `template`): initdb's bootstrap costs 1.5-3 s of CPU on the lab machine,
   * a copy of its ~40 MB result a fraction of that, and the PostgreSQL tests
   * make ~50 clusters per run.
   */
  async initdb(): Promise<void> {
    await mkdir(this.dataDir, { recursive: true, mode: 0o700 });
    const { uid, gid } = await osUserIds(this.osUser);
    await chown(this.dataDir, uid, gid);
    const templates = process.env[PG_TEMPLATES_ENV];
    if (this.opts.template === false || !templates) await this.runInitdb(this.dataDir);
    else {
      const template = await this.templateDir(templates);
      // Mode and owner only: timestamps and xattrs mean nothing to PostgreSQL, and skipping them halves cp's time (~1000 files).
      const c = await execa('cp', ['-r', '--preserve=mode,ownership', `${template}/.`, this.dataDir], { reject: false, stdin: 'ignore', timeout: 180_000 });
      if (c.exitCode !== 0) throw new BlocksnapError('E_PG', `copying ${template} to ${this.dataDir} failed: ${String(c.stderr || c.shortMessage).trim()}`, { cause: c });
    }
    await syncFs(this.dataDir);
  }

  private async runInitdb(dataDir: string): Promise<void> {
    // -N + one syncfs of the data directory's filesystem (by the caller): as durable on return as
    // initdb's own sync (PG 17's --sync-method=syncfs), which fsyncs ~1000 files
    // one by one, each a flush through the lab's loop devices (~0.5 s per initdb here).
    const args = ['-N', '-D', dataDir, ...INITDB_ARGS];
    const r = await this.asOsUser(path.join(this.binDir, 'initdb'), args);
    if (r.exitCode !== 0) {
      throw new BlocksnapError('E_PG', `initdb ${dataDir} failed: ${String(r.stderr || r.shortMessage).trim()}`, { cause: r });
    }
  }

  /**
   * This build's template data directory: `<root>/<key>/data`,
   * keyed by the initdb binary (path, size, mtime), its arguments and the OS user,
   * made once (initdb into a staging directory, then an atomic rename: a
   * concurrent maker's rename loses and its copy is removed) and reused by
   * later clusters of the run. Never started, so it stays a clean initdb result.
   */
  private async templateDir(root: string): Promise<string> {
    const initdb = path.join(this.binDir, 'initdb');
    const st = await stat(initdb);
    const key = createHash('sha256').update(JSON.stringify([initdb, st.size, st.mtimeMs, INITDB_ARGS, this.osUser])).digest('hex').slice(0, 16);
    const done = path.join(root, key);
    const data = path.join(done, 'data');
    if (await access(data).then(() => true, () => false)) return data;
    await mkdir(root, { recursive: true, mode: 0o755 });
    await chmod(root, 0o755);
    const staging = await mkdtemp(path.join(root, `.${key}-`));
    try {
      await chmod(staging, 0o755);
      const { uid, gid } = await osUserIds(this.osUser);
      await mkdir(path.join(staging, 'data'), { mode: 0o700 });
      await chown(path.join(staging, 'data'), uid, gid);
      await this.runInitdb(path.join(staging, 'data'));
      await syncFs(staging);
      await rename(staging, done).catch(async (e: NodeJS.ErrnoException) => {
        if (e.code !== 'ENOTEMPTY' && e.code !== 'EEXIST') throw e;
      });
    } finally {
      await rm(staging, { recursive: true, force: true });
    }
    return data;
  }

  async start(): Promise<void> {
    if (this._pid !== undefined && (await isAlive(this._pid, this.startTime))) return;
    const runDir = await this.ensureRunDir();
    const ledger = await this.getLedger();
    this.postmasterIndex ??= await ledger.add({ kind: 'postmaster', dataDir: this.dataDir, pid: null, startTime: null });
    const fixedPort = this.opts.port !== undefined;
    for (let attempt = 1; ; attempt++) {
      const port = this.opts.port ?? (await freePort());
      const settings = { listen_addresses: '127.0.0.1', ...this.settings };
      const serverOpts = [`-p ${port}`, `-k '${runDir}'`, ...Object.entries(settings).map(([k, v]) => `-c ${k}='${v}'`)].join(' ');
      const r = await this.asOsUser(path.join(this.binDir, 'pg_ctl'), ['start', '-D', this.dataDir, '-l', this.logFile!, '-w', '-t', '120', '-o', serverOpts]);
      if (r.exitCode === 0) {
        this._port = port;
        break;
      }
      const log = await readFile(this.logFile!, 'utf8').catch(() => '');
      const portTaken = /could not bind|address already in use|could not create any TCP\/IP sockets/i.test(log);
      if (fixedPort || !portTaken || attempt >= 3) {
        await this.stop().catch(() => undefined);
        throw new BlocksnapError('E_PG', `pg_ctl start ${this.dataDir} failed: ${String(r.stderr).trim()}\n${log.slice(-2000)}`, { cause: r });
      }
    }
    const pid = await this.readPidFile();
    if (pid === undefined) throw new BlocksnapError('E_PG', `started ${this.dataDir} but postmaster.pid is unreadable`);
    this._pid = pid;
    this.startTime = await processStartTime(pid);
    await ledger.update(this.postmasterIndex, { pid, startTime: this.startTime });
  }

  private async readPidFile(): Promise<number | undefined> {
    try {
      const first = (await readFile(path.join(this.dataDir, 'postmaster.pid'), 'utf8')).split('\n')[0]!.trim();
      return /^\d+$/.test(first) ? Number(first) : undefined;
    } catch {
      return undefined;
    }
  }

  /**
   * Fast shutdown with pg_ctl; if that fails, signals the recorded postmaster
   * PID (and only it). Idempotent; also after a failed start.
   */
  async stop(): Promise<void> {
    const pid = this._pid ?? (await this.readPidFile());
    if (pid === undefined) return;
    const startTime = this._pid === pid ? this.startTime : null;
    // A copied data directory carries the pid file of the cluster it was
    // copied from: pg_ctl would signal *that* postmaster. Only ours is stopped.
    if (await isPostmasterOf(pid, startTime, this.dataDir)) {
      const r = await this.asOsUser(path.join(this.binDir, 'pg_ctl'), ['stop', '-D', this.dataDir, '-m', 'fast', '-w', '-t', '60'], { timeout: 90_000 });
      if (r.exitCode !== 0 || (await isAlive(pid, startTime))) {
        await stopPostmasterByPid(pid, startTime, this.dataDir, 5_000);
      }
    }
    this._pid = undefined;
    this.startTime = null;
  }

  /** Stops the server and releases the run directory and the ledger. */
  async destroy(): Promise<void> {
    await this.stop();
    if (!this.ledger) return;
    const actions = await releaseResources(this.ledger.path, this.ledger.resources);
    const failed = actions.filter((a) => a.outcome === 'failed');
    if (failed.length) throw new BlocksnapError('E_PG', `cannot release ${failed.map((a) => `${a.target}: ${a.detail}`).join('; ')}`);
    await this.ledger.delete();
    this.ledger = undefined;
    this.postmasterIndex = undefined;
  }

  connectionConfig(database = 'postgres'): pg.ClientConfig {
    return { host: '127.0.0.1', port: this.port, user: 'postgres', database, connectionTimeoutMillis: 10_000 };
  }

  async query<R extends pg.QueryResultRow = Record<string, unknown>>(sql: string, params?: unknown[], database?: string): Promise<R[]> {
    const client = new pg.Client(this.connectionConfig(database));
    try {
      await client.connect();
      return (await client.query<R>(sql, params)).rows;
    } catch (e) {
      throw new BlocksnapError('E_PG', `query on port ${this._port} failed: ${(e as Error).message}`, { cause: e });
    } finally {
      await client.end().catch(() => undefined);
    }
  }

  private async pgbenchRun(args: string[]) {
    const r = await execa(path.join(this.clientBinDir, 'pgbench'), ['-h', '127.0.0.1', '-p', String(this.port), '-U', 'postgres', ...args, 'postgres'], {
      reject: false,
      stdin: 'ignore',
      timeout: 600_000,
      extendEnv: false,
      env: { PATH: process.env.PATH ?? '/usr/bin:/bin', LC_ALL: 'C' },
    });
    if (r.exitCode !== 0) {
      throw new BlocksnapError('E_PG', `pgbench ${args.join(' ')} failed: ${String(r.stderr || r.shortMessage).trim()}`, { cause: r });
    }
    return `${String(r.stdout)}\n${String(r.stderr)}`;
  }

  async pgbenchInit(scale: number): Promise<void> {
    await this.pgbenchRun(['-i', '-q', '-s', String(scale)]);
  }

  async pgbench(opts: { transactions: number; clients: number; jobs?: number }): Promise<PgbenchResult> {
    const jobs = opts.jobs ?? Math.min(opts.clients, 2);
    const output = await this.pgbenchRun(['-n', '-t', String(opts.transactions), '-c', String(opts.clients), '-j', String(jobs)]);
    const tps = /tps = ([\d.]+)/.exec(output);
    const done = /number of transactions actually processed: (\d+)/.exec(output);
    if (!tps || !done) throw new BlocksnapError('E_PG', `unexpected pgbench output:\n${output}`);
    return { tps: Number(tps[1]), transactions: Number(done[1]), output };
  }
}
