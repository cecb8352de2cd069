-- The schema Ferrylink's last release without migrations (before Alembic) created
-- on postgresql: SQLModel.metadata.create_all's statements, frozen. Do not edit.

CREATE TABLE cluster_server (
	id VARCHAR(64) NOT NULL, 
	position INTEGER NOT NULL, 
	api_url VARCHAR(512) NOT NULL, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_cluster_server_position ON cluster_server (position);

CREATE TABLE cluster_setting (
	key VARCHAR(64) NOT NULL, 
	value VARCHAR(1024) NOT NULL, 
	updated_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (key)
);

CREATE TABLE leader_lease (
	id INTEGER NOT NULL, 
	holder VARCHAR(64) NOT NULL, 
	expires_at FLOAT NOT NULL, 
	term INTEGER NOT NULL, 
	PRIMARY KEY (id)
);

CREATE TABLE cluster_state (
	id INTEGER NOT NULL, 
	epoch INTEGER NOT NULL, 
	"primary" VARCHAR(64), 
	issued_until FLOAT NOT NULL, 
	assignment_json VARCHAR NOT NULL, 
	PRIMARY KEY (id)
);

CREATE TABLE processed_event (
	event_id VARCHAR(64) NOT NULL, 
	kind VARCHAR(64) NOT NULL, 
	node_id VARCHAR(64) NOT NULL, 
	processed_at FLOAT NOT NULL, 
	PRIMARY KEY (event_id)
);

CREATE INDEX ix_processed_event_node_id ON processed_event (node_id);

CREATE INDEX ix_processed_event_processed_at ON processed_event (processed_at);

CREATE TABLE account (
	name VARCHAR(64) NOT NULL, 
	password_hash VARCHAR(512), 
	ssh_public_keys VARCHAR NOT NULL, 
	home VARCHAR(512) NOT NULL, 
	enabled BOOLEAN NOT NULL, 
	created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (name)
);

CREATE TABLE partner (
	name VARCHAR(64) NOT NULL, 
	protocol VARCHAR(8) NOT NULL, 
	host VARCHAR(255) NOT NULL, 
	port INTEGER NOT NULL, 
	username VARCHAR(128) NOT NULL, 
	password VARCHAR(1024), 
	private_key VARCHAR, 
	private_key_passphrase VARCHAR(1024), 
	remote_folder VARCHAR(1024) NOT NULL, 
	host_key VARCHAR, 
	check_host_key BOOLEAN NOT NULL, 
	url VARCHAR(2048) NOT NULL, 
	verify_tls BOOLEAN NOT NULL, 
	created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (name)
);

CREATE TABLE route (
	id SERIAL NOT NULL, 
	account VARCHAR(64) NOT NULL, 
	pattern VARCHAR(255) NOT NULL, 
	position INTEGER NOT NULL, 
	steps_json VARCHAR NOT NULL, 
	enabled BOOLEAN NOT NULL, 
	created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_route_account ON route (account);

CREATE TABLE transfer (
	id SERIAL NOT NULL, 
	leg_key VARCHAR(200) NOT NULL, 
	cycle_id VARCHAR(64) NOT NULL, 
	event_id VARCHAR(64) NOT NULL, 
	leg VARCHAR(64) NOT NULL, 
	direction VARCHAR(16) NOT NULL, 
	account VARCHAR(64) NOT NULL, 
	file_name VARCHAR(1024) NOT NULL, 
	bytes INTEGER NOT NULL, 
	protocol VARCHAR(16) NOT NULL, 
	partner VARCHAR(64), 
	status VARCHAR(16) NOT NULL, 
	node_id VARCHAR(64) NOT NULL, 
	started_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	finished_at TIMESTAMP WITH TIME ZONE, 
	duration_ms INTEGER, 
	detail VARCHAR(2000) NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (leg_key)
);

CREATE INDEX ix_transfer_cycle_id ON transfer (cycle_id);

CREATE INDEX ix_transfer_file_name ON transfer (file_name);

CREATE INDEX ix_transfer_account ON transfer (account);

CREATE INDEX ix_transfer_event_id ON transfer (event_id);

CREATE INDEX ix_transfer_direction ON transfer (direction);

CREATE INDEX ix_transfer_status ON transfer (status);

CREATE INDEX ix_transfer_started_at ON transfer (started_at);

CREATE TABLE step_run (
	event_id VARCHAR(64) NOT NULL, 
	step_index INTEGER NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	result VARCHAR(4096) NOT NULL, 
	finished_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (event_id, step_index)
);

CREATE TABLE route_counter (
	route_id SERIAL NOT NULL, 
	value BIGINT NOT NULL, 
	PRIMARY KEY (route_id)
);

CREATE TABLE event_claim (
	event_id VARCHAR(64) NOT NULL, 
	owner VARCHAR(128) NOT NULL, 
	expires_at FLOAT NOT NULL, 
	attempts INTEGER NOT NULL, 
	last_error VARCHAR(2000) NOT NULL, 
	PRIMARY KEY (event_id)
);

CREATE TABLE outbox (
	id SERIAL NOT NULL, 
	routing_key VARCHAR(255) NOT NULL, 
	body BYTEA NOT NULL, 
	message_id VARCHAR(200) NOT NULL, 
	headers_json VARCHAR NOT NULL, 
	created_at FLOAT NOT NULL, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_outbox_created_at ON outbox (created_at);

CREATE TABLE dead_event (
	id VARCHAR(64) NOT NULL, 
	queue VARCHAR(255) NOT NULL, 
	reason VARCHAR(1000) NOT NULL, 
	body BYTEA NOT NULL, 
	headers_json VARCHAR NOT NULL, 
	dead_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	replayed_at TIMESTAMP WITH TIME ZONE, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_dead_event_dead_at ON dead_event (dead_at);

CREATE TABLE watched_folder (
	id SERIAL NOT NULL, 
	account VARCHAR(64) NOT NULL, 
	folder VARCHAR(1024) NOT NULL, 
	pattern VARCHAR(255) NOT NULL, 
	recursive BOOLEAN NOT NULL, 
	settle_seconds FLOAT NOT NULL, 
	enabled BOOLEAN NOT NULL, 
	created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_watched_folder_account ON watched_folder (account);

CREATE TABLE watched_file (
	watch_id INTEGER NOT NULL, 
	path VARCHAR(1024) NOT NULL, 
	size BIGINT NOT NULL, 
	mtime_ns BIGINT NOT NULL, 
	observed_at FLOAT NOT NULL, 
	event_id VARCHAR(64), 
	emitted_at FLOAT, 
	PRIMARY KEY (watch_id, path)
);

CREATE TABLE scheduled_job (
	id SERIAL NOT NULL, 
	name VARCHAR(128) NOT NULL, 
	kind VARCHAR(32) NOT NULL, 
	cron VARCHAR(255), 
	interval_seconds FLOAT, 
	timezone VARCHAR(64) NOT NULL, 
	start_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	params_json VARCHAR NOT NULL, 
	misfire_grace_seconds FLOAT NOT NULL, 
	coalesce BOOLEAN NOT NULL, 
	enabled BOOLEAN NOT NULL, 
	version INTEGER NOT NULL, 
	created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	updated_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (name)
);

CREATE TABLE job_run (
	id SERIAL NOT NULL, 
	job_id INTEGER NOT NULL, 
	fire_time TIMESTAMP WITH TIME ZONE NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	node_id VARCHAR(64) NOT NULL, 
	event_id VARCHAR(64) NOT NULL, 
	event_json VARCHAR NOT NULL, 
	claimed_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	submitted_at TIMESTAMP WITH TIME ZONE, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_job_run_fire_time UNIQUE (job_id, fire_time)
);

CREATE INDEX ix_job_run_status ON job_run (status);

CREATE INDEX ix_job_run_job_id ON job_run (job_id);

CREATE INDEX ix_job_run_fire_time ON job_run (fire_time);

CREATE TABLE scheduled_file (
	id SERIAL NOT NULL, 
	job_id VARCHAR(64) NOT NULL, 
	partner VARCHAR(64) NOT NULL, 
	direction VARCHAR(8) NOT NULL, 
	name VARCHAR(1024) NOT NULL, 
	size BIGINT NOT NULL, 
	mtime FLOAT NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	event_id VARCHAR(64) NOT NULL, 
	arrived_event_id VARCHAR(64), 
	local_path VARCHAR(2048) NOT NULL, 
	done_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_scheduled_file_version UNIQUE (job_id, partner, direction, name, size, mtime)
);

CREATE INDEX ix_scheduled_file_job_id ON scheduled_file (job_id);

CREATE TABLE sentinel_endpoint (
	id SERIAL NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	url VARCHAR(2048) NOT NULL, 
	paused BOOLEAN NOT NULL, 
	batch_size INTEGER NOT NULL, 
	max_backlog INTEGER NOT NULL, 
	max_age_seconds FLOAT NOT NULL, 
	created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (name)
);

CREATE TABLE sentinel_cycle (
	cycle_id VARCHAR(64) NOT NULL, 
	next_seq INTEGER NOT NULL, 
	updated_at FLOAT NOT NULL, 
	PRIMARY KEY (cycle_id)
);

CREATE INDEX ix_sentinel_cycle_updated_at ON sentinel_cycle (updated_at);

CREATE TABLE sentinel_leg (
	leg_key VARCHAR(200) NOT NULL, 
	cycle_id VARCHAR(64) NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	seq INTEGER NOT NULL, 
	updated_at FLOAT NOT NULL, 
	PRIMARY KEY (leg_key)
);

CREATE INDEX ix_sentinel_leg_cycle_id ON sentinel_leg (cycle_id);

CREATE TABLE sentinel_record (
	id VARCHAR(220) NOT NULL, 
	cycle_id VARCHAR(64) NOT NULL, 
	seq INTEGER NOT NULL, 
	body_json VARCHAR NOT NULL, 
	linked_at FLOAT NOT NULL, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_sentinel_record_linked_at ON sentinel_record (linked_at);

CREATE INDEX ix_sentinel_record_cycle_id ON sentinel_record (cycle_id);

CREATE TABLE sentinel_outbox (
	id SERIAL NOT NULL, 
	endpoint_id INTEGER NOT NULL, 
	record_id VARCHAR(220) NOT NULL, 
	created_at FLOAT NOT NULL, 
	PRIMARY KEY (id), 
	CONSTRAINT uq_sentinel_outbox_record UNIQUE (endpoint_id, record_id)
);

CREATE INDEX ix_sentinel_outbox_endpoint_id ON sentinel_outbox (endpoint_id);

CREATE TABLE sentinel_delivery (
	endpoint_id SERIAL NOT NULL, 
	dropped BIGINT NOT NULL, 
	delivered BIGINT NOT NULL, 
	failures INTEGER NOT NULL, 
	last_success_at FLOAT, 
	last_error VARCHAR(1000) NOT NULL, 
	last_error_at FLOAT, 
	PRIMARY KEY (endpoint_id)
);

CREATE TABLE admin_user (
	name VARCHAR(64) NOT NULL, 
	password_hash VARCHAR(512) NOT NULL, 
	role VARCHAR(16) NOT NULL, 
	enabled BOOLEAN NOT NULL, 
	created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (name)
);

CREATE TABLE api_token (
	id VARCHAR(32) NOT NULL, 
	secret_sha256 VARCHAR(64) NOT NULL, 
	admin VARCHAR(64) NOT NULL, 
	description VARCHAR(255) NOT NULL, 
	created_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	expires_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	revoked_at TIMESTAMP WITH TIME ZONE, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_api_token_admin ON api_token (admin);

CREATE INDEX ix_api_token_expires_at ON api_token (expires_at);

CREATE TABLE audit_record (
	id SERIAL NOT NULL, 
	at TIMESTAMP WITH TIME ZONE NOT NULL, 
	actor VARCHAR(64) NOT NULL, 
	address VARCHAR(64) NOT NULL, 
	action VARCHAR(64) NOT NULL, 
	target VARCHAR(255) NOT NULL, 
	before_json VARCHAR, 
	after_json VARCHAR, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_audit_record_at ON audit_record (at);

CREATE INDEX ix_audit_record_action ON audit_record (action);

CREATE INDEX ix_audit_record_actor ON audit_record (actor);

CREATE INDEX ix_audit_record_target ON audit_record (target);

CREATE TABLE idempotency_record (
	key VARCHAR(64) NOT NULL, 
	request_sha256 VARCHAR(64) NOT NULL, 
	status INTEGER NOT NULL, 
	headers_json VARCHAR NOT NULL, 
	body BYTEA NOT NULL, 
	created_at FLOAT NOT NULL, 
	expires_at FLOAT NOT NULL, 
	PRIMARY KEY (key)
);

CREATE INDEX ix_idempotency_record_expires_at ON idempotency_record (expires_at);

CREATE TABLE service_url (
	node_id VARCHAR(64) NOT NULL, 
	service VARCHAR(64) NOT NULL, 
	url VARCHAR(512) NOT NULL, 
	updated_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (node_id, service)
);

CREATE TABLE edge_limits (
	id INTEGER NOT NULL, 
	sessions_per_account INTEGER NOT NULL, 
	idle_timeout_s INTEGER NOT NULL, 
	max_file_bytes BIGINT NOT NULL, 
	quota_bytes BIGINT NOT NULL, 
	updated_at TIMESTAMP WITH TIME ZONE NOT NULL, 
	PRIMARY KEY (id)
);
