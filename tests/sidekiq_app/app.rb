# The Rails-like app around the README's Ruby snippets (test_sidekiq_e2e.py): ActiveRecord on
# the test's schema, Sidekiq on the test's Redis database. Loaded by `sidekiq -r` (the server)
# and by sign_up.rb (the web side). OUTBOX_SNIPPETS is the folder the test wrote the README's
# user.rb and welcome_email_job.rb to.
require "active_record"
require "sidekiq"

ActiveRecord::Base.establish_connection(
  url: ENV.fetch("DATABASE_URL"), schema_search_path: ENV.fetch("OUTBOX_TEST_SCHEMA"), pool: 8
)

class ApplicationRecord < ActiveRecord::Base
  self.abstract_class = true
end

class WelcomeEmail < ApplicationRecord
end

Sidekiq.configure_client do |config|
  config.redis = { url: ENV.fetch("REDIS_URL") }
end

Sidekiq.configure_server do |config|
  config.redis = { url: ENV.fetch("REDIS_URL") }
  # Poll the schedule set every second, starting at once (not after Sidekiq's 10 s warm-up).
  config.average_scheduled_poll_interval = 1
  config.options[:poll_interval_average] = 1
end

require File.join(ENV.fetch("OUTBOX_SNIPPETS"), "welcome_email_job.rb")
require File.join(ENV.fetch("OUTBOX_SNIPPETS"), "user.rb")
