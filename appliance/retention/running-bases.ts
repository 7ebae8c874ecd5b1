/**
 * The images running jobs build on (DESIGN.md §12.1): never removed while the
 * job runs. For a member being transferred it is the basis it took; for a
 * member not begun yet (or a job just dispatched) it is the volume's last
 * image, the one `beginVolume` would take (basis-policy.ts), so a prune can
 * never slip in between the job's start and its basis decision.
 */
import type { Catalog } from '../catalog/catalog.js';
import type { JobRouter } from '../server/job-router.js';

export function runningBasesOf(router: JobRouter, catalog: Catalog): { imageId: string; jobId: string }[] {
  const out: { imageId: string; jobId: string }[] = [];
  for (const job of router.activeJobs()) {
    if (job.finished) continue;
    for (const volume of job.members) {
      const t = job.transfers.get(volume);
      if (t) {
        if (t.basisImageId) out.push({ imageId: t.basisImageId, jobId: job.id });
        continue;
      }
      const vol = catalog.volume(job.agentId, volume);
      const last = vol ? catalog.lastImage(vol.id) : undefined;
      if (last) out.push({ imageId: last.id, jobId: job.id });
    }
  }
  return out;
}
