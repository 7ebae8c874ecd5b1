import { BlocksnapError } from '../../../proto/errors.js';
import type { PgRole, PgServerInfo, Quiescer, QuiesceInfo, QuiesceOptions, ReleaseReport, UnquiesceResult } from '../quiescer.js';

/**
 * A pretend database server for tests of code that quiesces: it knows what
 * is held on it (a label per quiesce window), like a PostgreSQL server knows
 * its running backups and its replay pause, so a test can ask whether a
 * quiescer left something behind. Its WAL position moves 1 MiB per window.
 */
export class FakeDatabase {
  /** Labels of the quiesce windows held now. */
  readonly held = new Set<string>();
  /** Every window completed by unquiesce, in order. */
  readonly completed: UnquiesceResult[] = [];
  /** The next quiesce rejects with this (nothing held), once. */
  failNextQuiesce: BlocksnapError | null = null;
  private lsn = 0x3000000;

  constructor(
    readonly role: PgRole = 'primary',
    readonly version = 150000,
    readonly systemIdentifier = '7300000000000000001',
  ) {}

  /** @internal The next WAL position, as PostgreSQL prints one. */
  advance(): string {
    this.lsn += 1 << 20;
    return `${Math.floor(this.lsn / 2 ** 32).toString(16).toUpperCase()}/${(this.lsn % 2 ** 32).toString(16).toUpperCase()}`;
  }
}

export interface FakeQuiescerOptions {
  /** What the server must be (default 'auto'). */
  role?: PgRole | 'auto';
  /** Release the hold if unquiesce has not come this long after quiesce (default 600 s). */
  watchdogSeconds?: number;
}

const LABEL_RE = /^[\x20-\x7e]{1,200}$/;

/** A Quiescer over a FakeDatabase: the Quiescer contract, and nothing else. */
export class FakeQuiescer implements Quiescer {
  private state: 'new' | 'connected' | 'quiesced' | 'expired' | 'closed' = 'new';
  private window: { label: string; startLsn: string; t0: number } | null = null;
  private watchdog: NodeJS.Timeout | null = null;

  constructor(
    readonly db: FakeDatabase,
    private readonly opts: FakeQuiescerOptions = {},
  ) {}

  async connect(): Promise<PgServerInfo> {
    const expect = this.opts.role ?? 'auto';
    if (expect !== 'auto' && expect !== this.db.role) {
      throw new BlocksnapError('E_PG', `the fake database is a ${this.db.role}, but it is configured as a ${expect}`);
    }
    if (this.state === 'new' || this.state === 'closed') this.state = 'connected';
    return { version: this.db.version, major: String(Math.floor(this.db.version / 10000)), role: this.db.role, backendPid: process.pid, systemIdentifier: this.db.systemIdentifier };
  }

  async quiesce(opts: QuiesceOptions): Promise<QuiesceInfo> {
    if (this.state !== 'connected') throw new BlocksnapError('E_USAGE', `quiesce: the quiescer is ${this.state}, not connected`);
    if (!LABEL_RE.test(opts.label)) throw new BlocksnapError('E_USAGE', `backup label must be 1–200 printable ASCII characters: ${JSON.stringify(opts.label)}`);
    const failure = this.db.failNextQuiesce;
    if (failure) {
      this.db.failNextQuiesce = null;
      throw failure;
    }
    const startLsn = this.db.advance();
    this.window = { label: opts.label, startLsn, t0: performance.now() };
    this.db.held.add(opts.label);
    this.state = 'quiesced';
    this.watchdog = setTimeout(() => {
      this.release();
      this.state = 'expired';
    }, (this.opts.watchdogSeconds ?? 600) * 1000);
    const primary = this.db.role === 'primary';
    return { role: this.db.role, version: this.db.version, exclusive: false, backup: true, startLsn, replayLsn: primary ? null : startLsn, seconds: 0 };
  }

  async unquiesce(): Promise<UnquiesceResult> {
    if (this.state === 'expired') {
      this.state = 'connected';
      throw new BlocksnapError('E_TIMEOUT', `the watchdog released the quiesce after ${this.opts.watchdogSeconds ?? 600} s; this image has no valid backup label`);
    }
    if (this.state !== 'quiesced' || !this.window) throw new BlocksnapError('E_USAGE', `unquiesce: the quiescer is ${this.state}, not quiesced`);
    const w = this.window;
    this.release();
    this.state = 'connected';
    const stopLsn = this.db.advance();
    const seconds = (performance.now() - w.t0) / 1000;
    const result: UnquiesceResult = {
      labelFile: `START WAL LOCATION: ${w.startLsn} (file 000000010000000000000003)\nCHECKPOINT LOCATION: ${w.startLsn}\n` +
        `BACKUP METHOD: streamed\nBACKUP FROM: ${this.db.role}\nSTART TIME: ${new Date().toISOString()}\nLABEL: ${w.label}\nSTART TIMELINE: 1\n`,
      spcmapFile: '', startLsn: w.startLsn, stopLsn, timeline: 1,
      ...(this.db.role === 'standby' ? { replayLsn: w.startLsn } : {}),
      exclusive: false, version: this.db.version, role: this.db.role, pausedSeconds: this.db.role === 'standby' ? seconds : 0, backupSeconds: seconds,
    };
    this.db.completed.push(result);
    return result;
  }

  async close(): Promise<ReleaseReport> {
    const report: ReleaseReport = { released: [], failed: [] };
    if (this.state === 'quiesced') {
      this.release();
      report.released.push('stopped backup');
    }
    this.state = 'closed';
    return report;
  }

  private release(): void {
    if (this.watchdog) clearTimeout(this.watchdog);
    this.watchdog = null;
    if (this.window) this.db.held.delete(this.window.label);
    this.window = null;
  }
}
