/**
 * Which images a retention policy keeps (DESIGN.md §12.1), with Proxmox
 * Backup Server's documented semantics, in UTC:
 *
 * - keep-last N: the N newest images.
 * - keep-hourly/daily/weekly/monthly/yearly N: the newest image of each of
 *   the N newest periods (hour, day, ISO week Monday..Sunday, month, year)
 *   that have an image.
 * - The options are applied in that order; each one only looks at images no
 *   earlier option decided, and skips periods an earlier option already
 *   covers (an image it kept lies in them): so options combine, and a later
 *   option only reaches further back in time. An older image of a period an
 *   option kept is removed for good (a later, coarser option does not take
 *   it back), as in PBS's `mark_selections`.
 * - Everything no option kept is removed. No option at all keeps everything
 *   (the caller refuses that as a usage error for `prune`).
 *
 * Pure: images in, decision out. Image sets and protections are applied by
 * the caller (retention-service.ts) on top of this per-volume decision.
 */
export interface KeepOptions {
  last?: number;
  hourly?: number;
  daily?: number;
  weekly?: number;
  monthly?: number;
  yearly?: number;
}

export const KEEP_KINDS = ['last', 'hourly', 'daily', 'weekly', 'monthly', 'yearly'] as const;
export type KeepKind = (typeof KEEP_KINDS)[number];

export interface PruneCandidate {
  id: string;
  /** ISO-8601 time of the image (UTC). */
  createdAt: string;
}

export interface PruneDecision {
  /** id → the option that kept it. */
  keep: Map<string, KeepKind>;
  remove: string[];
}

export function hasKeepOption(k: KeepOptions): boolean {
  return KEEP_KINDS.some((n) => (k[n] ?? 0) > 0);
}

const pad = (n: number, w = 2) => String(n).padStart(w, '0');

/** ISO 8601 week-numbering year and week of a UTC date ("2020/53"). */
export function isoWeek(d: Date): string {
  // Thursday of this week decides the year (ISO 8601).
  const t = new Date(Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), d.getUTCDate()));
  const dow = (t.getUTCDay() + 6) % 7; // Monday = 0
  t.setUTCDate(t.getUTCDate() - dow + 3);
  const year = t.getUTCFullYear();
  const jan4 = new Date(Date.UTC(year, 0, 4));
  const week = 1 + Math.round(((t.getTime() - jan4.getTime()) / 86_400_000 - 3 + ((jan4.getUTCDay() + 6) % 7)) / 7);
  return `${year}/${pad(week)}`;
}

/** The period an image falls in for one option (UTC). */
export function periodOf(kind: KeepKind, iso: string, id: string): string {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) throw new Error(`image ${id}: invalid time ${iso}`);
  const y = d.getUTCFullYear();
  const m = pad(d.getUTCMonth() + 1);
  const day = pad(d.getUTCDate());
  switch (kind) {
    case 'last':
      return `${iso}/${id}`; // every image is its own period
    case 'hourly':
      return `${y}/${m}/${day}/${pad(d.getUTCHours())}`;
    case 'daily':
      return `${y}/${m}/${day}`;
    case 'weekly':
      return isoWeek(d);
    case 'monthly':
      return `${y}/${m}`;
    case 'yearly':
      return `${y}`;
  }
}

/** The PBS algorithm (mark_selections per option, newest first). */
export function decidePrune(images: readonly PruneCandidate[], opts: KeepOptions): PruneDecision {
  const keep = new Map<string, KeepKind>();
  if (!hasKeepOption(opts)) {
    for (const i of images) keep.set(i.id, 'last');
    return { keep, remove: [] };
  }
  const t = (i: PruneCandidate) => Date.parse(i.createdAt);
  const newestFirst = [...images].sort((a, b) => (t(a) === t(b) ? (a.id < b.id ? 1 : -1) : t(b) - t(a)));
  // An older image of a period some option kept is marked removed for good: a later option does
  // not pick it up again (PBS: mark_selections skips every image already marked).
  const removed = new Set<string>();
  for (const kind of KEEP_KINDS) {
    const n = opts[kind] ?? 0;
    if (n <= 0) continue;
    // Periods already covered by images an earlier option kept.
    const covered = new Set<string>();
    for (const i of newestFirst) if (keep.has(i.id)) covered.add(periodOf(kind, i.createdAt, i.id));
    const chosen = new Set<string>();
    for (const i of newestFirst) {
      if (keep.has(i.id) || removed.has(i.id)) continue;
      const p = periodOf(kind, i.createdAt, i.id);
      if (covered.has(p)) continue;
      if (chosen.has(p)) {
        removed.add(i.id); // an older image of a period this option already kept
        continue;
      }
      if (chosen.size >= n) break;
      chosen.add(p);
      keep.set(i.id, kind);
    }
  }
  return { keep, remove: newestFirst.filter((i) => !keep.has(i.id)).map((i) => i.id) };
}
