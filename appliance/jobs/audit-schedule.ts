import type { Catalog } from '../catalog/catalog.js';

/**
 * When the appliance asks an incremental to audit the agent's change tracker
 * (RunJob.audit, DESIGN.md §4.2): once `every` committed incrementals of the
 * volume ran since its last audited job. 0 = only when an operator asks.
 */
export function auditDue(catalog: Catalog, agent: string, volume: string, every: number): boolean {
  if (every <= 0) return false;
  let since = 0;
  for (const j of catalog.listJobs(10_000)) {
    if (j.agent !== agent || j.volumeName !== volume || j.state !== 'committed') continue;
    if (j.stats?.audited) break;
    if (j.kind === 'incremental') since++;
  }
  return since >= every;
}
