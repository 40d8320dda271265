#!/usr/bin/perl
# A real Perl Gearman::Worker (2.004) for integration tests.
#
# Usage: worker.pl HOST:PORT [--client-id ID] [--no-echo]
#
# Why this library: it sends plain GRAB_JOB, so gearmand answers JOB_ASSIGN (no unique);
# it sends SET_CLIENT_ID before every CAN_DO; after a GRAB_JOB it waits only 0.5 s for the
# reply before dropping the connection; a handler that dies makes it send WORK_EXCEPTION
# and then WORK_FAIL for the same handle.
#
# Functions:
#   reverse  payload reversed (binary safe)
#   echo     payload unchanged
#   block    payload is a path P: writes the job HANDLE to P.started (Gearman::Job has no
#            unique: JOB_ASSIGN does not carry one), waits (10 ms polls, up to 60 s) until
#            P exists, returns "unblocked" (returns undef -> WORK_FAIL on timeout)
# There is no `unique` function: a GRAB_JOB worker never learns the unique id.
#
# Ready signal: after registering (SET_CLIENT_ID + CAN_DO per function, sent synchronously
# by register_function) it sends one ECHO_REQ and reads the ECHO_RES, which proves gearmand
# processed the registration, then prints "ready". --no-echo skips the ECHO_REQ and prints
# "ready" once the registration was written. SIGTERM exits 0.
use strict;
use warnings;

use Getopt::Long qw(GetOptions);
use IO::Handle;
use Time::HiRes qw(sleep time);
use Gearman::Worker;
use Gearman::Util;

my $BLOCK_TIMEOUT_S = 60;
my $BLOCK_POLL_S    = 0.01;

my ($client_id, $no_echo);
GetOptions("client-id=s" => \$client_id, "no-echo" => \$no_echo)
    or die "usage: $0 HOST:PORT [--client-id ID] [--no-echo]\n";
my $address = shift @ARGV or die "usage: $0 HOST:PORT [--client-id ID] [--no-echo]\n";

$SIG{TERM} = sub { exit 0 };
STDOUT->autoflush(1);

my $worker = Gearman::Worker->new(
    job_servers => [$address],
    (defined $client_id ? (client_id => $client_id) : ()),
);

my %functions = (
    reverse => sub { return scalar reverse $_[0]->arg },
    echo    => sub { return $_[0]->arg },
    block   => \&do_block,
);

for my $name (sort keys %functions) {
    $worker->register_function($name => $functions{$name})
        or die "worker.pl: registering $name at $address failed\n";
}

unless ($no_echo) {
    # The socket register_function just used (and that work() will reuse).
    my $sock = $worker->_get_js_sock($worker->job_servers)
        or die "worker.pl: no connection to $address\n";
    my $req = Gearman::Util::pack_req_command("echo_req", "perlworker-ready");
    Gearman::Util::send_req($sock, \$req) or die "worker.pl: ECHO_REQ failed\n";
    Gearman::Util::wait_for_readability($sock->fileno, 10)
        or die "worker.pl: no ECHO_RES within 10 s\n";
    my $err;
    my $res = Gearman::Util::read_res_packet($sock, \$err)
        or die "worker.pl: reading ECHO_RES failed: " . ($err // "?") . "\n";
    $res->{type} eq "echo_res"
        or die "worker.pl: expected echo_res, got $res->{type}\n";
}
print "ready\n";

$worker->work while 1;

sub do_block {
    my ($job) = @_;
    my $path = $job->arg;
    open(my $fh, '>', "$path.started.tmp") or die "open $path.started.tmp: $!";
    binmode $fh;
    print {$fh} $job->handle;
    close $fh or die "close: $!";
    rename("$path.started.tmp", "$path.started") or die "rename: $!";  # atomic for readers
    my $deadline = time + $BLOCK_TIMEOUT_S;
    until (-e $path) {
        return undef if time >= $deadline;
        sleep $BLOCK_POLL_S;
    }
    return "unblocked";
}
