-- The blobs of a team's conversations are summed for its storage quota.
CREATE INDEX blob_refs_doc ON blob_refs (doc_id);
