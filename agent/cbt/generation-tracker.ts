import { BlocksnapError, toBlocksnapError } from '../../proto/errors.js';
import type { Generations } from './generations.js';
import type {
  ClosedGeneration,
  StartInfo,
  Tracker,
  TrackerCheckpoint,
  TrackerPhase,
  TrackerStartOptions,
  Validity,
} from './tracker.js';

/**
 * The part of the Tracker contract (tracker.ts) that does not depend on where
 * writes come from: phases, the generation switch, absorb/validity/invalidate
 * and the once-only stop. An implementation supplies the source of writes
 * (the kernel, a fake device) through the hooks below and records into
 * `this.gens`; the switching rules themselves live in Generations.
 */
export abstract class GenerationTracker implements Tracker {
  abstract readonly kind: string;
  /** Set by begin(): the generations writes are recorded into. */
  protected gens: Generations | null = null;
  /** Set by begin(). */
  protected info: StartInfo | null = null;
  private _phase: TrackerPhase = 'new';
  private stopping: Promise<TrackerCheckpoint> | null = null;

  /**
   * Starts recording writes of `opts.device` into a new `this.gens` and sets
   * `this.info`. Throws if it cannot track, leaving nothing behind.
   */
  protected abstract begin(opts: TrackerStartOptions): Promise<void>;

  /** The open generation with the device's identity and counters (see Tracker.checkpoint); the tracker is live. */
  protected abstract takeCheckpoint(): Promise<TrackerCheckpoint>;

  /** Before G+1 opens (prepareSwitch): optionally apply what is already queued, so it lands in G alone. */
  protected async settle(): Promise<void> {}

  /** Every write queued before this call is recorded when it resolves (completeSwitch). */
  protected async drain(): Promise<void> {}

  /** Gives back what begin() took; called once, by stop(), even when the final checkpoint failed. */
  protected async release(): Promise<void> {}

  /** After a successful stop (for logs). */
  protected stopped(_final: TrackerCheckpoint): void {}

  get phase(): TrackerPhase {
    return this._phase;
  }

  get generation(): number {
    return this.live().generation;
  }

  get startInfo(): StartInfo {
    if (!this.info) throw new BlocksnapError('E_TRACKER', 'tracker not started');
    return this.info;
  }

  async start(opts: TrackerStartOptions): Promise<void> {
    if (this._phase !== 'new') throw new BlocksnapError('E_TRACKER', `cannot start a tracker that is ${this._phase}`);
    await this.begin(opts);
    this._phase = 'tracking';
  }

  async prepareSwitch(): Promise<void> {
    const gens = this.live();
    if (gens.switching) throw new BlocksnapError('E_TRACKER', 'prepareSwitch called twice without completeSwitch');
    await this.settle();
    gens.beginSwitch();
    this._phase = 'switching';
  }

  async completeSwitch(): Promise<ClosedGeneration> {
    const gens = this.live();
    if (!gens.switching) throw new BlocksnapError('E_TRACKER', 'completeSwitch called without prepareSwitch');
    await this.drain();
    const closed = gens.finishSwitch();
    this._phase = 'tracking';
    return closed;
  }

  async abortSwitch(): Promise<void> {
    this.live().abortSwitch();
    this._phase = 'tracking';
  }

  absorb(closed: ClosedGeneration): void {
    this.live().absorb(closed);
  }

  validity(): Validity {
    return this.live().validity();
  }

  invalidate(reason: string): void {
    this.live().invalidate(reason);
  }

  async checkpoint(): Promise<TrackerCheckpoint> {
    this.live();
    return this.takeCheckpoint();
  }

  async stop(): Promise<TrackerCheckpoint> {
    if (!this.stopping) {
      this.live();
      this.stopping = (async () => {
        let cp: TrackerCheckpoint | null = null;
        let failure: unknown = null;
        try {
          cp = await this.takeCheckpoint();
        } catch (e) {
          failure = e;
        }
        // Always give the resources back, even when the checkpoint failed.
        await this.release().catch((e) => (failure ??= e));
        this._phase = 'stopped';
        if (failure !== null || cp === null) throw toBlocksnapError(failure, 'E_TRACKER');
        this.stopped(cp);
        return cp;
      })();
    }
    return this.stopping;
  }

  /** The generations, if the tracker is started and not stopping. */
  protected live(): Generations {
    if (this._phase === 'stopped' || this.stopping) throw new BlocksnapError('E_TRACKER', 'tracker is stopped');
    if (!this.gens) throw new BlocksnapError('E_TRACKER', 'tracker not started');
    return this.gens;
  }
}
