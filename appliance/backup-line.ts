/**
 * The human line of `blocksnap-appliance backup`. An incremental that did not
 * use the agent's change tracker (it compared every chunk's digest instead:
 * slower, never wrong) says so and why — an operator sees a tracker problem
 * without --json (the reason travels in TransferStats.fallbackReason).
 */
export interface BackupResult {
  ok: boolean;
  jobId: string;
  imageId?: string;
  errorCode?: string;
  errorMessage?: string;
  stats?: { changeSource?: unknown; fallbackReason?: unknown };
}

export function backupLine(r: BackupResult): string {
  if (!r.ok) return `FAILED ${r.jobId}: ${r.errorCode} ${r.errorMessage}`;
  const reason = r.stats?.fallbackReason ? String(r.stats.fallbackReason) : '';
  const note = reason ? `\nincremental fell back to ${String(r.stats?.changeSource || 'digest-compare')} (not the tracker): ${reason}` : '';
  return `ok ${r.jobId} image ${r.imageId}${note}`;
}
