import { describe, expect, it } from 'vitest';
import { backupLine } from '../../appliance/backup-line.js';

/** The human output of `blocksnap-appliance backup` (the e2e signals test sees it from the real CLI too). */
describe('backup line', () => {
  it('says when and why an incremental did not use the tracker', () => {
    expect(backupLine({ ok: true, jobId: 'job-1', imageId: 'img-1', stats: { changeSource: 'tracker', fallbackReason: '' } })).toBe('ok job-1 image img-1');
    expect(backupLine({ ok: true, jobId: 'job-2', imageId: 'img-2', stats: { changeSource: 'digest-compare', fallbackReason: 'tracker: agent did not shut down cleanly' } }))
      .toBe('ok job-2 image img-2\nincremental fell back to digest-compare (not the tracker): tracker: agent did not shut down cleanly');
    expect(backupLine({ ok: false, jobId: 'job-3', errorCode: 'E_BUSY', errorMessage: 'busy' })).toBe('FAILED job-3: E_BUSY busy');
  });
});
