import { EventEmitter } from 'node:events';
import type { JobProgress, JobResult, TransferStats } from '../../proto/messages.js';
import { WalCollector } from '../jobs/wal-collector.js';
import type { ManifestStats } from '../store/manifest.js';
import type { Ingest } from './ingest.js';

/**
 * A job between RunJob and its end, in memory. The catalog row is the
 * durable record; this holds what only matters while the job runs: the
 * ingest, the session currently carrying it, and who is waiting.
 *
 * States: dispatched → transferring → committed (image visible, waiting for
 * the agent's JobResult) → done; or failed at any point.
 */
export type ActiveState = 'dispatched' | 'transferring' | 'committed' | 'done' | 'failed';

export interface JobOutcome {
  ok: boolean;
  jobId: string;
  imageId?: string;
  errorCode?: string;
  errorMessage?: string;
  stats?: Partial<TransferStats> & Record<string, unknown>;
}

/** One volume of a job: a lone volume, or a member of a consistency group. */
export interface MemberTransfer {
  volume: string;
  ingest: Ingest;
  volumeId: number;
  basisAccepted: boolean;
  basisImageId: string | null;
  resumes: number;
  /** Set at the member's EndVolume (group job): its map is durable, its manifest waits for CommitSet. */
  ended: { rootDigest: Buffer; stats: ManifestStats; agentStats?: TransferStats } | null;
}

export class ActiveJob extends EventEmitter {
  state: ActiveState = 'dispatched';
  /** Member volume → its transfer, in the order they began. */
  readonly transfers = new Map<string, MemberTransfer>();
  /** The member whose chunks arrive now (the last one begun). */
  current: MemberTransfer | null = null;
  /** The first member's image for a group (job and JobResult refer to it); the image otherwise. */
  imageId: string | null = null;
  /** A group job: the set and every member's image once committed. */
  setId: string | null = null;
  images: { volume: string; imageId: string }[] = [];
  sessionId: string;
  /** The agent process (Hello.instanceId) that runs the job. */
  instanceId = '';
  /** What the agent's quiesce window returned and the WAL pieces received (app-consistent images). */
  readonly wal = new WalCollector();
  /** Chunk bytes received but not yet processed (flow-control policing). */
  queuedBytes = 0;
  /** Serializes the job's frames: batches, end and result run one after another. */
  chain: Promise<void> = Promise.resolve();
  graceTimer: NodeJS.Timeout | null = null;
  lastActivity = Date.now();
  readonly done: Promise<JobOutcome>;
  private resolveDone!: (o: JobOutcome) => void;

  /**
   * `volume` is what the job was asked for: a volume, or a group's name;
   * `members` the volumes it transfers; `group` is true for a group (even of
   * one), whose member images are committed together by CommitSet.
   */
  constructor(
    readonly id: string,
    readonly agent: string,
    readonly agentId: number,
    readonly volume: string,
    readonly requestedMode: 'full' | 'incremental',
    sessionId: string,
    readonly members: string[] = [volume],
    readonly group = false,
  ) {
    super();
    this.sessionId = sessionId;
    this.done = new Promise((r) => (this.resolveDone = r));
  }

  /** The ingest chunks go to now (the current member's), if any. */
  get ingest(): Ingest | null {
    return this.current?.ingest ?? null;
  }

  progress(p: JobProgress): void {
    this.lastActivity = Date.now();
    this.emit('progress', p);
  }

  settle(outcome: JobOutcome): void {
    if (this.state === 'done' || this.state === 'failed') return;
    this.state = outcome.ok ? 'done' : 'failed';
    if (this.graceTimer) clearTimeout(this.graceTimer);
    this.graceTimer = null;
    this.resolveDone(outcome);
  }

  get finished(): boolean {
    return this.state === 'done' || this.state === 'failed';
  }
}

export function outcomeFromResult(r: JobResult): JobOutcome {
  return {
    ok: r.ok, jobId: r.jobId, imageId: r.imageId || undefined, errorCode: r.errorCode || undefined,
    errorMessage: r.errorMessage || undefined, stats: r.stats ? { ...r.stats } : undefined,
  };
}
