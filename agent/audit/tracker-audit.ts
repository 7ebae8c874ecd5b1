/**
 * The tally of a tracker audit (DESIGN.md §7.2), shared by an audited backup
 * and the standalone `blocksnap-agent audit`: every chunk the full digest
 * comparison found changed is checked against the tracker's closed bitmap.
 * Missed = changed but not marked (must be 0: a miss is a silent data loss
 * in the next tracker-driven incremental); extra = marked but unchanged
 * (allowed: the bitmap may be a superset).
 */
export const MISSED_SAMPLE = 20;

export interface AuditTallyResult {
  changed: number;
  tracked: number;
  missed: number;
  extra: number;
  /** The first MISSED_SAMPLE missed chunk indexes. */
  missedSample: number[];
}

export class TrackerAudit {
  private changed = 0;
  private missed = 0;
  private readonly missedSample: number[] = [];
  private readonly seen = new Set<number>();

  /** `bitmap`: the closed generation's words; `tracked`: how many bits it has set. */
  constructor(private readonly bitmap: Uint32Array, private readonly tracked: number) {}

  /** A chunk the comparison found changed. A chunk noted twice (a resumed transfer re-reads) counts once. */
  changedChunk(index: number): void {
    if (this.seen.has(index)) return;
    this.seen.add(index);
    this.changed++;
    if (((this.bitmap[index >>> 5]! >>> (index & 31)) & 1) === 0) {
      this.missed++;
      if (this.missedSample.length < MISSED_SAMPLE) this.missedSample.push(index);
    }
  }

  result(): AuditTallyResult {
    return {
      changed: this.changed, tracked: this.tracked, missed: this.missed,
      extra: this.tracked - (this.changed - this.missed), missedSample: [...this.missedSample],
    };
  }
}
